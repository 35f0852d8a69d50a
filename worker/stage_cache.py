"""What a stage worker's long-lived process keeps in memory between probe stages.

Probe stages on cached features spend most of their time outside training reading the same arrays
again: the features of every text (one blob per shard), the shard records that say which blob holds
which text, the weak stage's soft labels that each student reads. :class:`CachingStore` keeps what
cannot change in memory, within a byte budget, least recently used first out:

- blobs: a blob is named by the SHA-256 of its bytes, so a name always means the same array;
- the records of feature shards: a shard's key is the hash of its texts, and its record names them
  and their blob (two workers extracting the same texts may store equal features twice; either is
  right).

Everything else is read through: a stage result may appear at any moment (another worker computed
it), and so may a new shard, so record listings are never cached. The store is shared by the stages
of one process, one at a time; it is not meant for threads.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np

from w2s.store import ArtifactStore

# Namespaces whose records never change once written (see above).
IMMUTABLE_NAMESPACES = ("features",)


def _immutable(namespace: str) -> bool:
    return any(namespace == name or namespace.startswith(name + "/") for name in IMMUTABLE_NAMESPACES)


class CachingStore(ArtifactStore):
    """An ArtifactStore that keeps blobs and feature-shard records in memory, up to ``budget_bytes``."""

    def __init__(self, uri: str, budget_bytes: int):
        super().__init__(uri)
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # -- the LRU ---------------------------------------------------------------------------------
    def _get(self, key: tuple[str, str]) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def _put(self, key: tuple[str, str], value: Any, size: int) -> None:
        if size > self.budget_bytes or key in self._entries:
            return
        self._entries[key] = (value, size)
        self.used_bytes += size
        while self.used_bytes > self.budget_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.used_bytes -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0

    # -- blobs -----------------------------------------------------------------------------------
    def get_array(self, digest: str) -> np.ndarray:
        """The stored array, shared between stages and therefore read-only (callers copy what they
        change; the library only reads them or copies them into tensors)."""
        cached = self._get(("blob", digest))
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        array = super().get_array(digest)
        array.setflags(write=False)
        self._put(("blob", digest), array, array.nbytes)
        return array

    def put_array(self, array: np.ndarray) -> str:
        """Store it, and keep a copy: what a stage writes (the weak stage's soft labels) the next
        stages of this process read."""
        digest = super().put_array(array)
        kept = np.array(array, copy=True)
        kept.setflags(write=False)
        self._put(("blob", digest), kept, kept.nbytes)
        return digest

    # -- records ---------------------------------------------------------------------------------
    def get_record(self, namespace: str, key: str) -> dict[str, Any] | None:
        if not _immutable(namespace):
            return super().get_record(namespace, key)
        cached = self._get(("record", f"{namespace}/{key}"))
        if cached is not None:
            return dict(cached)  # a shallow copy: the lists inside are only read
        try:
            raw = self.fs.cat_file(self._record_path(namespace, key))
        except FileNotFoundError:
            return None  # not cached: it may be written later
        record: dict[str, Any] = json.loads(raw)
        self._put(("record", f"{namespace}/{key}"), record, len(raw))
        return dict(record)


_stores: dict[tuple[str, int], CachingStore] = {}


def process_store(uri: str, budget_mb: int) -> ArtifactStore:
    """This process's store for ``uri``: one CachingStore, kept across stages; a plain store when
    the budget is 0."""
    if budget_mb <= 0:
        return ArtifactStore(uri)
    key = (uri, budget_mb)
    if key not in _stores:
        _stores.clear()  # the settings changed (tests do): drop what the old store held
        _stores[key] = CachingStore(uri, budget_mb * 2**20)
    return _stores[key]
