"""Registry datasets (sst2, sciq, ...) read the same way on every host: from ``W2S_DATA_DIR`` (a
directory, or a read-only mount every host has), or from ``W2S_DATA_URL`` (an fsspec URL such as
``s3://bucket/data``), whose files each host fetches into its own cache the first time a job needs
them. The API only asks whether the files are there; it reads none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from service.settings import Settings
from w2s.datasets import offline_layout
from w2s.store import RetryingFilesystem, local_folder, storage_options


def _remote(settings: Settings) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(settings.data_url, **storage_options(settings.data_url))
    return RetryingFilesystem(fs, settings.store_retry_s), root.rstrip("/")


def data_dir_for(dataset_name: Any, settings: Settings) -> Path | None:
    """The data directory the library reads for a job's dataset: W2S_DATA_DIR, or this host's copy
    (fetched now if need be) of the dataset's folder under W2S_DATA_URL."""
    if not settings.data_url or not isinstance(dataset_name, str):
        return settings.data_dir
    folder, _ = offline_layout(dataset_name)
    url_key = hashlib.sha256(settings.data_url.encode()).hexdigest()[:16]
    root = settings.state_dir / "cache" / "data" / url_key
    fs, remote = _remote(settings)

    def fill(partial: Path) -> None:
        for path in fs.find(f"{remote}/{folder}"):
            if str(path).endswith(".jsonl"):
                fs.get_file(path, str(partial / str(path).rsplit("/", 1)[-1]))

    local_folder(root / folder, fill)
    return root


def missing_splits(dataset_name: str, settings: Settings) -> str | None:
    """Why W2S_DATA_URL cannot serve ``dataset_name`` (a split file is missing), or None; lists the
    dataset's folder, reads nothing."""
    folder, stems = offline_layout(dataset_name)
    fs, remote = _remote(settings)
    try:
        present = {
            str(path).rsplit("/", 1)[-1].removesuffix(".jsonl")
            for path in fs.ls(f"{remote}/{folder}", detail=False)
        }
    except FileNotFoundError:
        present = set()
    for split, candidates in stems.items():
        if not present & set(candidates):
            looked = ", ".join(
                f"{settings.data_url.rstrip('/')}/{folder}/{stem}.jsonl" for stem in candidates
            )
            return f"dataset {folder!r} has no {split!r} split under W2S_DATA_URL: looked for {looked}"
    return None
