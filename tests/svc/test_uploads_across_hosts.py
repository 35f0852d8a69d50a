"""Uploads live in the artifact store, not on the API host's disk (issue: planning on another host
failed with 'custom dataset file not found' unless W2S_UPLOADS_DIR was one shared mount). Here the
store is a real S3-compatible server; the host that plans and runs the job has its own state dir
and never sees the API host's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers import S3Server
from service.db import reset_caches, session_scope
from service.models import Job
from service.settings import get_settings
from svc_support import queued_weak, tiny_job
from worker.control import plan_job_task
from worker.tasks import execute_stage


def rows(n: int = 80) -> bytes:
    words = ["good", "great", "bad", "awful"]
    return "".join(
        json.dumps(
            {"text": f"the film was {words[i % 4]} {i}", "label": int(words[i % 4] in ("good", "great"))}
        )
        + "\n"
        for i in range(n)
    ).encode()


def test_a_job_on_an_upload_is_planned_and_run_on_another_host(
    service_env: dict[str, str],
    s3_env: S3Server,
    client: TestClient,
    make_team,
    tiny_bert: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("W2S_ARTIFACT_STORE", s3_env.new_bucket())
    reset_caches()
    team = make_team()
    uploaded = client.post(
        "/v1/datasets",
        files={"file": ("reviews.jsonl", rows())},
        data={"name": "reviews"},
        headers=team.headers,
    )
    assert uploaded.status_code == 201, uploaded.text
    body = tiny_job(
        tiny_bert, tiny_bert, dataset={"name": f"upload:{uploaded.json()['id']}", "n_train": 40, "n_test": 20}
    )
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]

    # Another host: its own state dir; the API host's is gone altogether.
    shutil.rmtree(service_env["W2S_STATE_DIR"])
    monkeypatch.setenv("W2S_STATE_DIR", str(tmp_path / "worker-host"))
    reset_caches()
    assert plan_job_task(job_id) == "done"
    with session_scope() as session:
        assert session.get_one(Job, job_id).planned
    weak_id = queued_weak(job_id)
    assert execute_stage(weak_id, worker="worker-host", settings=get_settings()) == "succeeded"
    assert list((tmp_path / "worker-host" / "cache" / "uploads").glob("*/*.jsonl"))  # its own cached copy


def test_deleting_an_upload_removes_its_bytes_from_the_store_unless_shared(
    service_env: dict[str, str],
    s3_env: S3Server,
    client: TestClient,
    make_team,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    from w2s.store import ArtifactStore

    monkeypatch.setenv("W2S_ARTIFACT_STORE", s3_env.new_bucket())
    reset_caches()
    alice, bob = make_team(), make_team()
    content = rows(20)
    first = client.post("/v1/datasets", files={"file": ("a.jsonl", content)}, headers=alice.headers).json()
    again = client.post("/v1/datasets", files={"file": ("b.jsonl", content)}, headers=alice.headers).json()
    bobs = client.post("/v1/datasets", files={"file": ("c.jsonl", content)}, headers=bob.headers).json()
    store = ArtifactStore(get_settings().store_uri)
    alices_file = store._file_path("uploads", f"{alice.team_id}/{first['sha256']}")
    bobs_file = store._file_path("uploads", f"{bob.team_id}/{bobs['sha256']}")
    assert store.fs.exists(alices_file) and store.fs.exists(bobs_file)  # each team's bytes its own
    assert client.delete(f"/v1/datasets/{first['id']}", headers=alice.headers).status_code == 204
    assert store.fs.exists(alices_file)  # alice's second upload of the same bytes still needs them
    assert client.delete(f"/v1/datasets/{again['id']}", headers=alice.headers).status_code == 204
    assert not store.fs.exists(alices_file) and store.fs.exists(bobs_file)
    assert client.delete(f"/v1/datasets/{bobs['id']}", headers=bob.headers).status_code == 204
    assert not store.fs.exists(bobs_file)


def test_a_model_pushed_once_is_validated_without_weights_and_trained_on_another_host(
    service_env: dict[str, str],
    s3_env: S3Server,
    client: TestClient,
    make_team,
    tiny_bert: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # type: ignore[no-untyped-def]
    from w2s_service.cli import main

    monkeypatch.setenv("W2S_ARTIFACT_STORE", s3_env.new_bucket())
    monkeypatch.setenv("W2S_MODEL_ROOTS", json.dumps([str(tmp_path / "no-models-here")]))  # no local models
    monkeypatch.setenv("W2S_MODEL_CACHE_DIR", str(tmp_path / "api-host" / "models"))
    reset_caches()
    assert main(["models", "push", str(tiny_bert)]) == 0
    reference = capsys.readouterr().out.strip().splitlines()[-1]
    assert reference.startswith("store:")
    team = make_team()
    unknown = client.post(
        "/v1/jobs", json=tiny_job(Path("store:" + "0" * 64), tiny_bert), headers=team.headers
    )
    assert unknown.status_code == 422 and "models push" in unknown.text
    job = client.post("/v1/jobs", json=tiny_job(Path(reference), Path(reference)), headers=team.headers)
    assert job.status_code == 201, job.text
    assert job.json()["weak_model"] == reference
    assert not (tmp_path / "api-host").exists()  # the API read the manifest only, no file of the model

    monkeypatch.setenv("W2S_MODEL_CACHE_DIR", str(tmp_path / "worker-host" / "models"))
    reset_caches()
    job_id = job.json()["id"]
    assert plan_job_task(job_id) == "done"
    weak_id = queued_weak(job_id)
    assert execute_stage(weak_id, worker="worker-host", settings=get_settings()) == "succeeded"
    assert list((tmp_path / "worker-host" / "models").glob("*/model.safetensors"))


def test_registry_datasets_come_from_the_data_url_on_every_host(
    service_env: dict[str, str],
    s3_env: S3Server,
    client: TestClient,
    make_team,
    tiny_bert: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    from w2s.store import ArtifactStore

    bucket = s3_env.new_bucket().rsplit("/", 1)[0]
    data = ArtifactStore(f"{bucket}/data")
    for split in ("train", "test"):
        data.fs.put_file(
            str(Path(service_env["W2S_DATA_DIR"]) / "sst2" / f"{split}.jsonl"),
            f"{data.root}/sst2/{split}.jsonl",
        )
    data.fs.put_file(
        str(Path(service_env["W2S_DATA_DIR"]) / "sst2" / "train.jsonl"), f"{data.root}/sciq/train.jsonl"
    )
    monkeypatch.setenv("W2S_DATA_URL", f"{bucket}/data")
    monkeypatch.delenv("W2S_DATA_DIR")
    monkeypatch.setenv("W2S_ARTIFACT_STORE", f"{bucket}/store")
    reset_caches()
    team = make_team()
    no_test = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, dataset={"name": "sciq"}), headers=team.headers
    )
    assert no_test.status_code == 422 and "no 'test' split under W2S_DATA_URL" in no_test.text
    job = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers)
    assert job.status_code == 201, job.text
    assert not (Path(service_env["W2S_STATE_DIR"]) / "cache" / "data").exists()  # the API only listed

    monkeypatch.setenv("W2S_STATE_DIR", str(tmp_path / "worker-host"))
    reset_caches()
    assert plan_job_task(job.json()["id"]) == "done"
    assert list((tmp_path / "worker-host" / "cache" / "data").glob("*/sst2/train.jsonl"))
