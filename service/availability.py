"""Can this job's dataset and models be loaded here? Asked when a job is submitted, so a job that
would fail minutes later (after its weak stage trained) is refused at once with the fix.

Registry datasets come from ``W2S_DATA_DIR`` when it is set (the split files must exist), else from
the Hugging Face hub. Hub model ids load from the local Hugging Face cache, or from the hub. Whether
the hub answers is checked with a short request, remembered for a minute.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from service.settings import Settings
from w2s.spec import is_local_model_name

logger = logging.getLogger(__name__)

HUB_CHECK_TTL_S = 60.0
_hub: dict[str, tuple[bool, float]] = {}
_lock = threading.Lock()


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    with _lock:
        known = _hub.get("hub")
        if known is not None and known[1] > time.monotonic():
            return known[0]
    try:
        import httpx

        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        reachable = httpx.head(f"{endpoint}/api/models/gpt2", timeout=timeout_s).status_code < 500
    except Exception:  # DNS failure, no route, timeout: offline
        reachable = False
    with _lock:
        _hub["hub"] = (reachable, time.monotonic() + HUB_CHECK_TTL_S)
    return reachable


def in_local_hub_cache(model: str, revision: str | None) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache (so it loads offline)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cache_dir = os.environ.get("HF_HUB_CACHE") or str(home / "hub")  # read now, not at import
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir, revision=revision)
        return isinstance(found, str)
    except Exception:  # an id the cache cannot even name
        return False


def availability_errors(spec: Any, settings: Settings) -> list[tuple[str, str]]:
    """(field, message) for each dataset or model of ``spec`` that cannot be loaded here (a model
    pushed into the artifact store: that its manifest is there)."""
    from service.data_files import missing_splits
    from w2s.datasets import offline_split_file
    from w2s.model_store import is_store_model, model_manifest
    from w2s.store import ArtifactStore, StoreUnavailable

    errors: list[tuple[str, str]] = []
    name = spec.dataset.name
    if isinstance(name, str):  # a registry dataset (files are checked where they are resolved)
        if settings.data_url:
            try:
                problem = missing_splits(name, settings)
            except StoreUnavailable as error:  # logged with its cause; the answer names no URL
                logger.warning("W2S_DATA_URL unreadable while checking %s: %s", name, error)
                problem = "the service's data store cannot be read now; try again shortly"
            if problem:
                errors.append(("dataset.name", problem))
        elif settings.data_dir is not None:
            for split in ("train", "test"):
                try:
                    offline_split_file(name, split, Path(settings.data_dir))
                except ValueError as error:
                    errors.append(("dataset.name", f"{error} (the service reads W2S_DATA_DIR)"))
                    break
        elif not hub_reachable():
            errors.append(
                (
                    "dataset.name",
                    f"{name!r} would load from the Hugging Face hub, which this service cannot reach; "
                    "an admin sets W2S_DATA_DIR to a directory of <name>/<split>.jsonl files, or upload "
                    "your data with POST /v1/datasets",
                )
            )
    for role, model in spec.named_models():
        if is_local_model_name(model.model):
            continue  # a directory under the model roots (service/paths.py checked it)
        if is_store_model(model.model):  # its manifest in the store; no weights are read here
            try:
                model_manifest(model.model, ArtifactStore(settings.store_uri))
            except ValueError as error:
                errors.append((f"{role}.model", str(error).removeprefix("model: ")))
            continue
        if not in_local_hub_cache(model.model, model.revision) and not hub_reachable():
            roots = ", ".join(str(root) for root in settings.model_roots)
            errors.append(
                (
                    f"{role}.model",
                    f"{model.model!r} is not in this service's Hugging Face cache and the hub cannot be "
                    f"reached; use a model directory under the model roots ({roots})",
                )
            )
    return errors
