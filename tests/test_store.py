"""The content-addressed store: blobs named by their hash, records written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from w2s.store import ArtifactStore


def test_blobs_are_content_addressed(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    first = store.put_bytes(b"soft labels")
    assert store.put_bytes(b"soft labels") == first  # same content, same name, one file
    assert store.get_bytes(first) == b"soft labels"
    array = np.linspace(0, 1, 7)
    np.testing.assert_array_equal(store.get_array(store.put_array(array)), array)


def test_records_round_trip_and_leave_no_temporary_files(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    assert store.get_record("stages", "ab" * 32) is None
    store.put_record("stages", "ab" * 32, {"accuracy": 0.75})
    store.put_record("stages", "ab" * 32, {"accuracy": 0.8})  # a redelivered stage overwrites whole
    assert store.get_record("stages", "ab" * 32) == {"accuracy": 0.8}
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_fsspec_uri(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/nested")
    digest = store.put_bytes(b"x")
    assert (tmp_path / "nested" / "blobs" / digest[:2] / digest).is_file()
