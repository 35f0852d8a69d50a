"""The artifact store on object storage: s3:// URIs against a real S3-compatible server (moto's
server mode), configured as a deployment would be (W2S_STORE_ENDPOINT_URL, W2S_STORE_REGION and the
standard AWS credential variables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import S3Server
from w2s.pipeline import run_experiment
from w2s.spec import parse_spec
from w2s.store import ArtifactStore


def test_blobs_records_sizes_and_deletes_on_s3(s3_env: S3Server) -> None:
    store = ArtifactStore(s3_env.new_bucket())
    digest = store.put_bytes(b"soft labels")
    assert store.put_bytes(b"soft labels") == digest and store.get_bytes(digest) == b"soft labels"
    array = np.linspace(0, 1, 7)
    np.testing.assert_array_equal(store.get_array(store.put_array(array)), array)
    assert store.blob_size(digest) == len(b"soft labels")
    store.put_record("stages", "ab" * 32, {"accuracy": 0.8})
    assert store.get_record("stages", "ab" * 32) == {"accuracy": 0.8}
    assert store.record_keys("stages") == ["ab" * 32]
    assert store.delete_blob(digest) and not store.delete_blob(digest)
    assert not [path for path in store.fs.find(store.root) if ".tmp-" in path]


def test_a_second_host_sees_records_written_after_it_listed(s3_env: S3Server) -> None:
    """No cached listings: a host that listed a namespace sees another host's later record."""
    uri = s3_env.new_bucket()
    here, there = ArtifactStore(uri), ArtifactStore(uri)
    assert here.record_keys("stages") == []
    there.put_record("stages", "cd" * 32, {"accuracy": 0.5})
    assert here.record_keys("stages") == ["cd" * 32]


def test_an_experiment_runs_with_its_store_on_s3(
    s3_env: S3Server, tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec = parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 64, "n_test": 32, "seed": 0},
            "weak": {"model": str(tiny_bert), **options},
            "strong": {"model": str(tiny_bert), **options},
            "losses": ["xent"],
            "seeds": [0],
        }
    )
    on_s3 = run_experiment(spec, store=ArtifactStore(s3_env.new_bucket()), data_dir=sst2_dir)
    on_disk = run_experiment(spec, store=ArtifactStore(str(tmp_path / "store")), data_dir=sst2_dir)
    assert on_s3.results["per_seed"] == on_disk.results["per_seed"]  # the store changes nothing


def test_an_s3_store_without_s3fs_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec.registry

    def missing(*args: object, **kwargs: object) -> None:
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(ImportError, match=r"pip install 'w2s-service\[s3\]'"):
        ArtifactStore("s3://bucket/store")
    del fsspec.registry
