"""Where an uploaded dataset's bytes live: in the artifact store, under the team that uploaded them
(``files/uploads/<team>/<sha256>``), so every host (the API that took the upload, the control workers
that plan and finish its jobs) reads the same file wherever it runs. A host that needs the file as a
path (the w2s library reads a path) fetches it once into its node-local cache, checked against the
hash.

Per team, and always written: an upload takes the same path and the same time whatever any other
team stored, so nobody can learn from an upload's answer that another team holds the same bytes.
(Before, uploads were content-addressed blobs shared by every team: an upload of bytes another team
had stored skipped the write and answered measurably sooner.)

``datasets.path`` is ``store:uploads/<team>/<sha256>`` for these, ``store:<sha256>`` for a shared
blob of an older upload, and for an older upload still, its local path on the API host.
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
UPLOADS = "uploads"  # the store's namespace of named files holding uploads


def stored_path(team_id: str, sha256: str) -> str:
    return f"{STORED}{UPLOADS}/{team_id}/{sha256}"


def store_upload(store: ArtifactStore, team_id: str, sha256: str, local_path: str) -> None:
    """Write the upload's bytes to the team's place in the store, whatever is there already."""
    store.put_named_file(UPLOADS, f"{team_id}/{sha256}", local_path)


def delete_upload(store: ArtifactStore, path: str) -> None:
    """Remove an upload's bytes (``datasets.path``) from the store."""
    where = path.removeprefix(STORED)
    if where.startswith(f"{UPLOADS}/"):
        store.delete_named_file(UPLOADS, where.removeprefix(f"{UPLOADS}/"))
    else:  # a shared blob of an older upload
        store.delete_blob(where)


def local_copy(dataset: Dataset, settings: Settings, store: ArtifactStore | None = None) -> Path:
    """A path on this host holding the upload's bytes: its node-local cached copy (fetched from the
    store the first time, in a folder of the team's own), or, for an upload from before uploads were
    stored, its own file."""
    if not dataset.path.startswith(STORED):
        return Path(dataset.path)
    where = dataset.path.removeprefix(STORED)
    digest = where.rsplit("/", 1)[-1]
    folder = settings.state_dir / "cache" / "uploads" / dataset.team_id
    target = folder / f"{digest}.{dataset.format}"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{digest[:12]}.", suffix=".part")
    os.close(handle)
    try:
        store = store or ArtifactStore(settings.store_uri)
        if where.startswith(f"{UPLOADS}/"):
            found = store.get_named_file(UPLOADS, where.removeprefix(f"{UPLOADS}/"), temp)
        else:  # a shared blob of an older upload
            Path(temp).write_bytes(store.get_bytes(digest))
            found = True
        if not found:
            raise OSError(f"the stored upload {digest[:12]} is missing from the store; upload the file again")
        if _sha256_of(Path(temp)) != digest:
            raise OSError(f"the stored upload {digest[:12]} does not match its hash; upload the file again")
        os.replace(temp, target)  # complete or absent: parallel fetches of one upload both end well
    finally:
        Path(temp).unlink(missing_ok=True)
    return target


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
