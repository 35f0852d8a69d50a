"""Settings of the w2s library, read from the environment with the prefix ``W2S_``.

The service's settings extend this class, so every component reads the same variables.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def project_root() -> Path | None:
    """The source checkout this code runs from (pyproject.toml beside the packages), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def default_home() -> Path:
    """Where state lives when no setting says, whatever the current directory: the checkout's
    ``.w2s/`` when running from a source checkout, else ``$XDG_DATA_HOME/w2s`` (~/.local/share/w2s)."""
    root = project_root()
    if root is not None:
        return root / ".w2s"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "w2s"


class LibrarySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="W2S_", extra="ignore")

    data_dir: Path | None = Field(
        None, description="directory of <dataset>/<split>.jsonl files; unset = load from the hub"
    )
    artifact_store: str = Field(
        default_factory=lambda: str(default_home() / "store"),
        description="artifact store: a local directory or an fsspec URI (s3://..., gs://...)",
    )


@lru_cache
def library_settings() -> LibrarySettings:
    return LibrarySettings()
