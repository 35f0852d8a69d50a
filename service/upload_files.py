"""Where an uploaded dataset's bytes live: in the artifact store, as a blob named by their sha256,
so every host (the API that took the upload, the control workers that plan and finish its jobs) reads
the same file wherever it runs. A host that needs the file as a path (the w2s library reads a path)
fetches it once into its node-local cache, checked against the hash.

``datasets.path`` is ``store:<sha256>`` for these; an older upload kept on the API host's disk has its
local path there and is read from it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from service.models import Dataset
from service.settings import Settings
from w2s.store import ArtifactStore

STORED = "store:"


def stored_path(sha256: str) -> str:
    return f"{STORED}{sha256}"


def local_copy(dataset: Dataset, settings: Settings, store: ArtifactStore | None = None) -> Path:
    """A path on this host holding the upload's bytes: its node-local cached copy (fetched from the
    store the first time), or, for an upload from before uploads were stored, its own file."""
    if not dataset.path.startswith(STORED):
        return Path(dataset.path)
    digest = dataset.path.removeprefix(STORED)
    folder = settings.state_dir / "cache" / "uploads"
    target = folder / f"{digest}.{dataset.format}"
    if target.is_file():
        return target
    data = (store or ArtifactStore(settings.store_uri)).get_bytes(digest)
    if hashlib.sha256(data).hexdigest() != digest:
        raise OSError(f"the stored upload {digest[:12]} does not match its hash; upload the file again")
    folder.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{digest[:12]}.", suffix=".part")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(temp, target)  # complete or absent: parallel fetches of one upload both end well
    return target
