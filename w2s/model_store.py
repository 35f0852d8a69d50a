"""Models pushed into the artifact store once and fetched by every host that needs them.

``push_model(DIR)`` stores each file of a model directory as a blob (named by its sha256) and a
manifest record (namespace ``models``) listing them, with the model's ``config.json`` inline; the
model is then named ``store:<manifest sha256>`` in any job spec. A host that trains it fetches the
files into its node-local cache (``W2S_MODEL_CACHE_DIR``, at most ``W2S_MODEL_CACHE_GB``, least
recently used evicted), each file checked against its hash. A host that only tokenises or estimates
memory (planning) fetches everything but the weights; the API reads only the manifest.

The reference is the manifest's hash, so a stage key names exactly these bytes (no hashing of
weights on every host) and a pushed model cannot change under a job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any

from w2s.store import COMPLETE, ArtifactStore, local_folder

PREFIX = "store:"
MODELS = "models"  # the manifests' namespace in the store
# Files a tokenizer or a config never needs: left out of a fetch without weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_store_model(name: str) -> bool:
    return name.startswith(PREFIX)


def store_digest(name: str) -> str:
    """The manifest hash a ``store:`` reference names; ValueError if it is not one."""
    digest = name.removeprefix(PREFIX)
    if not _DIGEST.fullmatch(digest):
        raise ValueError(
            f"model: {name!r} is not a stored model: a stored model is 'store:' and the 64 hex digits "
            "that `w2s-service models push DIR` printed"
        )
    return digest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def push_model(directory: Path, store: ArtifactStore, name: str = "") -> str:
    """Store a model directory (every file but hidden ones); return its ``store:`` reference. Pushing
    the same files again stores nothing new and returns the same reference."""
    directory = directory.expanduser().resolve()
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is not a model directory: it has no config.json")
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue  # .git, caches
        digest = _file_sha256(path)
        store.put_file(str(path), digest)
        files.append({"path": relative.as_posix(), "size": path.stat().st_size, "sha256": digest})
    manifest_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    config = json.loads((directory / "config.json").read_text())
    store.put_record(
        MODELS, manifest_hash, {"files": files, "config": config, "name": name or directory.name}
    )
    return f"{PREFIX}{manifest_hash}"


def model_manifest(name: str, store: ArtifactStore) -> dict[str, Any]:
    """The manifest of a stored model; ValueError naming the fix when the store does not have it."""
    record = store.get_record(MODELS, store_digest(name))
    if record is None:
        raise ValueError(
            f"model: {name!r} is not in the artifact store: check the reference, or push the model "
            "directory with `w2s-service models push DIR` (an administrator's command) and use the "
            "reference it prints"
        )
    for entry in record["files"]:
        relative = PurePosixPath(entry["path"])
        if relative.is_absolute() or ".." in relative.parts:  # a manifest written by hand, or hostile
            raise ValueError(f"model: {name!r} has a file outside its directory: {entry['path']!r}")
    return record


def fetch_model(
    name: str, store: ArtifactStore, cache_dir: Path, *, weights: bool = True, cache_bytes: int | None = None
) -> Path:
    """A local directory holding the stored model (without its weight files unless ``weights``),
    fetched into ``cache_dir`` the first time; hosts and processes may fetch the same model at once
    (each writes its own temporary folder; the first complete one stays). Least recently used
    copies are removed while the cache holds more than ``cache_bytes``."""
    digest = store_digest(name)
    target = cache_dir / (digest if weights else f"{digest}-light")
    if (target / COMPLETE).is_file():
        os.utime(target / COMPLETE)  # recently used
        return target
    manifest = model_manifest(name, store)

    def fill(folder: Path) -> None:
        for entry in manifest["files"]:
            if not weights and entry["path"].endswith(WEIGHT_SUFFIXES):
                continue
            local = folder / entry["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            store.fs.get_file(store._path("blobs", entry["sha256"][:2], entry["sha256"]), str(local))
            if _file_sha256(local) != entry["sha256"]:
                raise OSError(f"model {name}: {entry['path']} does not match its hash; push the model again")

    local_folder(target, fill)
    if cache_bytes is not None:
        evict(cache_dir, cache_bytes, keep=target)
    return target


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def evict(cache_dir: Path, cache_bytes: int, keep: Path) -> list[Path]:
    """Remove the least recently used complete copies until the cache holds at most ``cache_bytes``
    (never ``keep``, the copy just asked for); returns what was removed."""
    copies = [p for p in cache_dir.iterdir() if (p / COMPLETE).is_file() and p != keep]
    used = {p: (p / COMPLETE).stat().st_mtime for p in copies}
    total = _size(keep) + sum(_size(p) for p in copies)
    removed = []
    for copy in sorted(copies, key=used.__getitem__):
        if total <= cache_bytes:
            break
        size = _size(copy)
        # Renamed first, so a process that is about to use it finds no half-deleted copy.
        doomed = copy.with_name(f".{copy.name}.{time.time_ns()}.evicted")
        copy.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        total -= size
        removed.append(copy)
    return removed
