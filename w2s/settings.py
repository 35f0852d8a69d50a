"""Settings of the w2s library, read from the environment with the prefix ``W2S_``.

The service's settings extend this class, so every component reads the same variables.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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
        description="artifact store: a local directory or an fsspec URI (s3://bucket/prefix, gs://...)",
    )
    # s3:// stores (pip install '.[s3]'). Credentials come from the standard AWS chain (environment,
    # ~/.aws, an instance or pod role: IRSA, workload identity), never from these settings.
    store_endpoint_url: str = Field(
        "", description="S3-compatible endpoint (MinIO, Ceph, R2, moto); empty = AWS's for the region"
    )
    store_region: str = Field("", description="the bucket's region; empty = the AWS chain's default")
    model_cache_dir: Path = Field(
        default_factory=lambda: default_home() / "model-cache",
        description="this host's copies of models pushed into the artifact store (store:<hash>)",
    )
    model_cache_gb: float = Field(
        200.0, gt=0, description="the most the model cache holds; least recently used copies are removed"
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="training stages write a resume checkpoint every N optimizer steps (0: off)"
    )
    checkpoint_every_s: float = Field(
        600.0,
        ge=0,
        description="... and every M seconds of training (0: off); a preempted or drained stage writes "
        "one at once either way. Resumed stages end exactly as uninterrupted ones",
    )
    store_retry_s: float = Field(
        900.0,
        ge=0,
        description="how long a store call is tried again while the store does not answer (back-off "
        "with jitter) before the work waits for storage: an outage costs time, not a result",
    )
    loss_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="modules imported when the loss registry first loads, whose import registers "
        "losses of your own (w2s.losses.register_loss): `my_pkg.losses,other_losses` or a JSON list. "
        "Every host that runs the API, `w2s run` or a worker needs them importable",
    )

    @field_validator("loss_modules", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        # Comma-separated, as a shell variable is usually written; a JSON list works too.
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            value = [item.strip() if isinstance(item, str) else item for item in value]
            value = [item for item in value if item != ""]
            for item in value:
                if not isinstance(item, str) or not all(part.isidentifier() for part in item.split(".")):
                    raise ValueError(
                        f"W2S_LOSS_MODULES: {item!r} is not a module name; give importable dotted "
                        "names, e.g. my_pkg.losses,other_losses"
                    )
        return value


@lru_cache
def library_settings() -> LibrarySettings:
    return LibrarySettings()
