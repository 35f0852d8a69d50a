"""Models pushed into the artifact store once, fetched by each host into a bounded cache, checked
against their hashes; a job names them store:<hash> (issue: models had to exist at the same
absolute path on the API host and every worker)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import S3Server
from w2s.model_store import COMPLETE, MODELS, WEIGHT_SUFFIXES, evict, fetch_model, model_manifest, push_model
from w2s.pipeline import run_experiment
from w2s.spec import parse_spec
from w2s.store import ArtifactStore


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != COMPLETE
    }


def test_push_and_fetch_through_s3_give_back_the_same_files(
    s3_env: S3Server, tiny_bert: Path, tmp_path: Path
) -> None:
    store = ArtifactStore(s3_env.new_bucket())
    reference = push_model(tiny_bert, store)
    assert reference.startswith("store:") and push_model(tiny_bert, store) == reference  # idempotent
    manifest = model_manifest(reference, store)
    assert manifest["config"] == json.loads((tiny_bert / "config.json").read_text())
    full = fetch_model(reference, store, tmp_path / "cache")
    assert files_of(full) == files_of(tiny_bert)
    light = fetch_model(reference, store, tmp_path / "cache", weights=False)
    assert set(files_of(light)) == {
        name for name in files_of(tiny_bert) if not name.endswith(WEIGHT_SUFFIXES)
    }
    assert any(name.endswith(WEIGHT_SUFFIXES) for name in files_of(tiny_bert))


def test_an_unknown_or_malformed_reference_says_how_to_push(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="w2s-service models push DIR"):
        model_manifest("store:" + "0" * 64, store)
    with pytest.raises(ValueError, match="64 hex digits"):
        model_manifest("store:gpt2", store)


def test_a_corrupted_blob_or_a_hostile_manifest_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    reference = push_model(tiny_bert, store)
    entry = model_manifest(reference, store)["files"][0]
    blob = tmp_path / "store" / "blobs" / entry["sha256"][:2] / entry["sha256"]
    blob.write_bytes(b"not what was pushed")
    with pytest.raises(OSError, match="does not match its hash"):
        fetch_model(reference, store, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-fetched left to be used
    record = model_manifest(reference, store) | {
        "files": [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]
    }
    store.put_record(MODELS, reference.removeprefix("store:"), record)
    with pytest.raises(ValueError, match="outside its directory"):
        fetch_model(reference, store, tmp_path / "cache2")


def test_the_cache_removes_the_least_recently_used_copies(
    tiny_bert: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    cache = tmp_path / "cache"
    bert, gpt2 = push_model(tiny_bert, store), push_model(tiny_gpt2, store)
    old = fetch_model(bert, store, cache)
    os.utime(old / COMPLETE, (1, 1))  # used long ago
    new = fetch_model(gpt2, store, cache, cache_bytes=1)  # only the one asked for fits
    assert new.is_dir() and not old.exists()
    assert evict(cache, 10**12, keep=new) == []


def test_an_experiment_on_a_stored_model_matches_the_directory(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_uri = str(tmp_path / "store")
    monkeypatch.setenv("W2S_ARTIFACT_STORE", store_uri)
    monkeypatch.setenv("W2S_MODEL_CACHE_DIR", str(tmp_path / "model-cache"))
    reference = push_model(tiny_bert, ArtifactStore(store_uri))
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}

    def spec(model: str) -> object:
        return parse_spec(
            {
                "dataset": {"name": "sst2", "n_train": 64, "n_test": 32, "seed": 0},
                "weak": {"model": model, **options},
                "strong": {"model": model, **options},
                "losses": ["xent"],
                "seeds": [0],
            }
        )

    stored = run_experiment(spec(reference), store=ArtifactStore(store_uri), data_dir=sst2_dir)
    local = run_experiment(
        spec(str(tiny_bert)), store=ArtifactStore(str(tmp_path / "other")), data_dir=sst2_dir
    )
    assert stored.results["per_seed"] == local.results["per_seed"]
    assert stored.manifest["models"]["weak"] == {"store": reference.removeprefix("store:")}
