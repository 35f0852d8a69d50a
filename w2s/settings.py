"""Settings of the w2s library, read from the environment with the prefix ``W2S_``.

The service's settings extend this class, so every component reads the same variables.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LibrarySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="W2S_", extra="ignore")

    data_dir: Path | None = Field(
        None, description="directory of <dataset>/<split>.jsonl files; unset = load from the hub"
    )
    artifact_store: str = Field(
        ".w2s/store", description="artifact store: a local directory or an fsspec URI (s3://..., gs://...)"
    )


@lru_cache
def library_settings() -> LibrarySettings:
    return LibrarySettings()
