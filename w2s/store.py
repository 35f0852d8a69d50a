"""A content-addressed artifact store on any fsspec filesystem (a local directory by default).

Layout under the root::

    blobs/<sha[:2]>/<sha256>            immutable bytes, named by their own hash
    index/<namespace>/<key[:2]>/<key>.json   a small JSON record per key (stage results, feature refs)

Every write goes to a temporary name first and is then renamed, so a reader never sees half a file
and a crashed writer leaves nothing behind that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Any

import fsspec
import numpy as np


class ArtifactStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write_atomic(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    # -- blobs ---------------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        """Store bytes; return their sha256, which names them."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path("blobs", digest[:2], digest)
        if not self.fs.exists(path):
            self._write_atomic(path, data)
        return digest

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

    def has_record(self, namespace: str, key: str) -> bool:
        return self.fs.exists(self._record_path(namespace, key))
