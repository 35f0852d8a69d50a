"""A content-addressed artifact store on any fsspec filesystem (a local directory by default).

Layout under the root::

    blobs/<sha[:2]>/<sha256>            immutable bytes, named by their own hash
    index/<namespace>/<key[:2]>/<key>.json   a small JSON record per key (stage results, feature refs)
    files/<namespace>/<name>            files replaced in place (resume checkpoints) or written once
                                        under a fresh name (saved checkpoints: files/checkpoints/<key>/<id>)

Every write goes to a temporary name first and is then renamed, so a reader never sees half a file
and a crashed writer leaves nothing behind that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import numpy as np

logger = logging.getLogger(__name__)
T = TypeVar("T")

# What a store answers that trying again will not change: a missing or existing key, no access, a
# bad argument. Anything else (a refused connection, a timeout, a 5xx, a dropped NFS mount) is
# weather: the call is tried again.
PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    NotImplementedError,
    ImportError,
)


# Called with "retry" or "unavailable" as calls are tried again or given up (the service counts them
# in its metrics; the library knows nothing of Prometheus).
RETRY_HOOKS: list[Callable[[str], None]] = []


def _report(event: str) -> None:
    for hook in RETRY_HOOKS:
        try:
            hook(event)
        except Exception:  # a metric must never break a store call
            logger.debug("store hook failed", exc_info=True)


CHECKPOINTS = "checkpoints"  # saved weights (save_checkpoint): files/checkpoints/<stage key>/<id>


class StoreUnavailable(Exception):
    """The artifact store did not answer within the retry budget (W2S_STORE_RETRY_S)."""


def with_retries(
    call: Callable[[], T], what: str, budget_s: float, sleep: Callable[[float], None] = time.sleep
) -> T:
    """``call()``, tried again on transient errors with exponential back-off and full jitter (0.5 s
    doubling up to 30 s) for ``budget_s``; then StoreUnavailable naming ``what`` and the error."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return call()
        except PERMANENT:
            raise
        except Exception as error:
            waited = time.monotonic() - started
            if waited >= budget_s:
                _report("unavailable")
                raise StoreUnavailable(
                    f"the artifact store did not answer for {waited:.0f} s ({what}): "
                    f"{type(error).__name__}: {str(error).strip()[:300]}"
                ) from error
            if attempt % 5 == 0:
                logger.warning(
                    "artifact store: %s failed (%s: %s); trying again", what, type(error).__name__, error
                )
            _report("retry")
            sleep(min(random.uniform(0, min(30.0, 0.5 * 2**attempt)), max(0.0, budget_s - waited)))
            attempt += 1


class RetryingFilesystem:
    """An fsspec filesystem whose every call is tried again on transient errors (``with_retries``):
    an outage of the store costs time, not an attempt or a computed result."""

    def __init__(self, fs: Any, budget_s: float):
        self._fs, self.budget_s = fs, budget_s

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._fs, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            target = f"{name} {args[0]}" if args else name
            return with_retries(lambda: attribute(*args, **kwargs), target, self.budget_s)

        return call


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` from the settings: an S3 endpoint and region for s3:// URIs (the
    credentials come from the standard AWS chain, read by botocore)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    from w2s.settings import LibrarySettings

    settings = LibrarySettings()
    client: dict[str, str] = {}
    if settings.store_endpoint_url:
        client["endpoint_url"] = settings.store_endpoint_url
    if settings.store_region:
        client["region_name"] = settings.store_region
    # No cached listings: other hosts write to the same bucket, and a stale listing would hide
    # their records.
    # Our own retries (with_retries) wait out an outage; botocore's would only hide how long it is.
    config = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 60}
    return {"client_kwargs": client, "config_kwargs": config, "use_listings_cache": False}


COMPLETE = ".w2s-complete"  # written last into a local copy: a copy without it is unfinished


def local_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """``target``, a folder this host keeps a copy in (a model, a dataset), filled by ``fill`` the
    first time. ``fill`` writes into a temporary folder of its own, which becomes ``target`` only
    once complete: processes and hosts sharing a disk may fetch the same thing at once (the first
    complete copy stays), and a fetch killed half-way leaves nothing that looks complete."""
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name[:40]}-{uuid.uuid4().hex[:8]}.part"
    partial.mkdir()
    try:
        fill(partial)
        (partial / COMPLETE).write_text(target.name)
        if not (target / COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # an unfinished copy of a crashed fetch
            try:
                partial.rename(target)
            except OSError:  # another fetch finished first: its copy is as good
                if not (target / COMPLETE).is_file():
                    raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


class ArtifactStore:
    def __init__(self, uri: str, options: dict[str, Any] | None = None, retry_s: float | None = None):
        """``retry_s``: how long each call is tried again while the store does not answer (default
        W2S_STORE_RETRY_S); then StoreUnavailable."""
        self.uri = uri
        try:
            fs, self.root = fsspec.core.url_to_fs(
                uri, **(storage_options(uri) if options is None else options)
            )
        except ImportError as error:  # s3:// without s3fs, gs:// without gcsfs
            raise ImportError(
                f"artifact store {uri!r} needs a filesystem package: {error}. For s3:// URIs, "
                "pip install 'w2s-service[s3]'"
            ) from error
        if retry_s is None:
            from w2s.settings import LibrarySettings

            retry_s = LibrarySettings().store_retry_s
        self.fs: Any = RetryingFilesystem(fs, retry_s)
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    @contextlib.contextmanager
    def patient(self) -> Iterator[None]:
        """Calls inside are tried again until the store answers, however long it is down: what they
        write took a training run to compute (a stage's result), and is never thrown away."""
        budget, self.fs.budget_s = self.fs.budget_s, math.inf
        try:
            yield
        finally:
            self.fs.budget_s = budget

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write_atomic(self, path: str, data: bytes) -> None:
        self._place_atomic(path, lambda tmp: self.fs.pipe_file(tmp, data))

    def _place_atomic(self, path: str, write: Callable[[str], Any]) -> None:
        """``write`` a temporary name beside ``path``, then move it there: readers never see a part."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        write(tmp)
        try:
            self.fs.mv(tmp, path)
        except FileNotFoundError:
            # A retried move whose first try went through (its answer was lost): done already.
            if not self.fs.exists(path):
                raise

    # -- blobs ---------------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        """Store bytes; return their sha256, which names them."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path("blobs", digest[:2], digest)
        if not self.fs.exists(path):
            self._write_atomic(path, data)
        return digest

    def put_file(self, local_path: str, digest: str) -> str:
        """Store a local file as the blob ``digest`` (its sha256, which the caller computed as it
        wrote the file), without reading it into memory; written once, atomically."""
        path = self._path("blobs", digest[:2], digest)
        if not self.fs.exists(path):
            self._place_atomic(path, lambda tmp: self.fs.put_file(local_path, tmp))
        return digest

    def blob_size(self, digest: str) -> int:
        return int(self.fs.size(self._path("blobs", digest[:2], digest)))

    def delete_blob(self, digest: str) -> bool:
        """Remove a blob; False if it was not there. Only for blobs nothing refers to any more."""
        path = self._path("blobs", digest[:2], digest)
        if not self.fs.exists(path):  # S3 answers a delete of a missing key with success
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def blob_digests(self) -> list[str]:
        """Every blob's digest (one listing: for checks, not for the hot path)."""
        return self._names_under(self._path("blobs"), lambda name: "." not in name)

    def _names_under(self, folder: str, keep: Callable[[str], bool]) -> list[str]:
        try:
            paths = self.fs.find(folder)
        except FileNotFoundError:
            return []
        names = (str(path).rsplit("/", 1)[-1] for path in paths)
        return [name for name in names if keep(name)]

    def get_bytes(self, digest: str) -> bytes:
        return self.fs.cat_file(self._path("blobs", digest[:2], digest))

    def put_array(self, array: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        return self.put_bytes(buffer.getvalue())

    def get_array(self, digest: str) -> np.ndarray:
        return np.load(io.BytesIO(self.get_bytes(digest)), allow_pickle=False)

    # -- keyed records -------------------------------------------------------------------------
    def _record_path(self, namespace: str, key: str) -> str:
        return self._path("index", namespace, key[:2], f"{key}.json")

    def get_record(self, namespace: str, key: str) -> dict[str, Any] | None:
        path = self._record_path(namespace, key)
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def put_record(self, namespace: str, key: str, record: dict[str, Any]) -> None:
        self._write_atomic(self._record_path(namespace, key), json.dumps(record, sort_keys=True).encode())

    def record_keys(self, namespace: str) -> list[str]:
        """Keys of every record in ``namespace`` (none if it does not exist yet)."""
        folder = self._path("index", namespace)
        try:
            paths = self.fs.find(folder)
        except FileNotFoundError:
            return []
        names = (str(path).rsplit("/", 1)[-1] for path in paths)
        return sorted(name.removesuffix(".json") for name in names if name.endswith(".json"))

    def record_size(self, namespace: str, key: str) -> int:
        return int(self.fs.size(self._record_path(namespace, key)))

    def has_record(self, namespace: str, key: str) -> bool:
        return self.fs.exists(self._record_path(namespace, key))

    # -- saved checkpoints: a fresh file per computation ---------------------------------------------
    # Not content-addressed: a checkpoint can be removed once nothing holds it (the service's
    # retention), and a later run that trains the same weights must never find its new file
    # removed by that. A fresh name per computation makes the removal of one never touch another.
    def put_checkpoint(self, key: str, data: bytes) -> str:
        """Store a stage's trained weights; return their reference (``<key>/<id>``)."""
        ref = f"{key}/{uuid.uuid4().hex}"
        self._write_atomic(self._file_path(CHECKPOINTS, ref), data)
        return ref

    def _checkpoint_path(self, ref: str) -> str:
        # A reference without a "/" is a checkpoint stored as a blob, as stores did before.
        if "/" in ref:
            return self._file_path(CHECKPOINTS, ref)
        return self._path("blobs", ref[:2], ref)

    def get_checkpoint(self, ref: str) -> bytes:
        return self.fs.cat_file(self._checkpoint_path(ref))

    def checkpoint_size(self, ref: str) -> int:
        return int(self.fs.size(self._checkpoint_path(ref)))

    def has_checkpoint(self, ref: str) -> bool:
        return bool(self.fs.exists(self._checkpoint_path(ref)))

    def delete_checkpoint(self, ref: str) -> bool:
        """Remove a checkpoint nothing holds any more; False if it was not there."""
        path = self._checkpoint_path(ref)
        if not self.fs.exists(path):  # S3 answers a delete of a missing key with success
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def checkpoint_refs(self) -> list[str]:
        """Every saved checkpoint's reference (one listing: for checks, not for the hot path)."""
        folder = self._file_path(CHECKPOINTS, "")
        try:
            paths = self.fs.find(folder)
        except FileNotFoundError:
            return []
        refs = ("/".join(str(path).rsplit("/", 2)[-2:]) for path in paths)  # <stage key>/<id>
        return [ref for ref in refs if ".tmp-" not in ref]

    def delete_record(self, namespace: str, key: str) -> bool:
        path = self._record_path(namespace, key)
        if not self.fs.exists(path):
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    # -- named files, overwritten in place (resume checkpoints) ------------------------------------
    def _file_path(self, namespace: str, name: str) -> str:
        return self._path("files", namespace, name)

    def put_named_file(self, namespace: str, name: str, local_path: str) -> None:
        """Store a local file under ``namespace/name``, replacing what was there, atomically (readers
        see the old file or the new one, never a part), without reading it into memory."""
        path = self._file_path(namespace, name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.put_file(local_path, tmp)
        try:
            self.fs.mv(tmp, path)
        except FileNotFoundError:
            if not self.fs.exists(path):
                raise

    def get_named_file(self, namespace: str, name: str, local_path: str) -> bool:
        """Copy ``namespace/name`` to ``local_path``; False if there is none."""
        path = self._file_path(namespace, name)
        if not self.fs.exists(path):
            return False
        try:
            self.fs.get_file(path, local_path)
        except FileNotFoundError:  # removed between the two calls
            return False
        return True

    def delete_named_file(self, namespace: str, name: str) -> bool:
        path = self._file_path(namespace, name)
        if not self.fs.exists(path):
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True
