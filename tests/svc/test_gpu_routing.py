"""Routing stages across GPU classes and CPU workers, checked on the CPU against the real Postgres:
a stage too large for every class is refused at planning with the numbers; out of memory moves a
stage one class up (or fails naming every class tried), never retries blindly; probe heads train
on CPU workers once a GPU computed their features; an error in the long-lived process gives its
memory back; `dev` gives each GPU worker a GPU of its own."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from helpers import registered_losses
from service import lifecycle
from service.db import reset_caches, session_scope
from service.models import Job, LogLine, Stage
from service.settings import get_settings
from svc_support import Steps, tiny_job
from w2s_service.cli import stage_workers
from worker import tasks
from worker.control import plan_job_task
from worker.tasks import execute_stage

GPU_CLASSES = {"gpu-24g": 24.0, "gpu-80g": 80.0}


@pytest.fixture
def gpu_deployment(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Settings of a cluster with two GPU classes and a CPU queue (nothing here runs on a GPU)."""
    slots = {"gpu-24g": 1, "gpu-80g": 1, "cpu": 1}
    monkeypatch.setenv("W2S_QUEUE_SLOTS", json.dumps(slots))
    monkeypatch.setenv("W2S_GPU_CLASSES", json.dumps(GPU_CLASSES))
    reset_caches()
    return slots


def stages_of(job_id: str) -> dict[str, Stage]:
    with session_scope() as session:
        rows = session.scalars(select(Stage).where(Stage.job_id == job_id)).all()
        for row in rows:
            session.expunge(row)
        return {row.kind: row for row in rows}


def job_of(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_a_stage_larger_than_every_gpu_class_is_refused_at_planning_with_the_numbers(
    client: TestClient,
    make_team,
    tiny_gpt2: Path,
    gpu_deployment: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("W2S_GPU_CLASSES", json.dumps({"gpu-24g": 2.0, "gpu-80g": 3.0}))  # tiny cards
    reset_caches()
    body = tiny_job(tiny_gpt2, tiny_gpt2)
    body["strong"] |= {"max_length": 4096, "batch_size": 64, "minibatch_size": 64}
    job_id = client.post("/v1/jobs", json=body, headers=make_team().headers).json()["id"]
    plan_job_task(job_id)
    job = job_of(job_id)
    assert job.status == "failed"
    assert "needs an estimated" in job.error and "GiB" in job.error and "activations" in job.error
    assert "gpu-80g: 3 GiB" in job.error and "minibatch_size (now 64;" in job.error
    assert "gradient_checkpointing" in job.error and "lora" in job.error
    assert "stage weak" not in job.error  # the weak model fits: only what is too large is named


def test_probe_students_train_their_heads_on_a_cpu_worker_after_the_ceiling_computed_features(
    client: TestClient, make_team, tiny_bert: Path, gpu_deployment: dict[str, int]
) -> None:  # type: ignore[no-untyped-def]
    body = tiny_job(tiny_bert, tiny_bert, losses=["xent", "logconf"])
    for role in ("weak", "strong"):
        body[role]["mode"] = "probe"
    job_id = client.post("/v1/jobs", json=body, headers=make_team().headers).json()["id"]
    plan_job_task(job_id)
    stages = stages_of(job_id)
    weak, ceiling = stages["weak"], stages["ceiling"]
    assert weak.gpu_class in GPU_CLASSES and ceiling.gpu_class in GPU_CLASSES  # features on a GPU
    students = [stage for kind, stage in stages.items() if kind.startswith("student:")]
    assert len(students) == 2
    for student in students:
        assert student.gpu_class == "cpu" and student.features_from_id == ceiling.id
        assert not student.ready

    record = {"key": "k", "accuracy": 0.5, "auroc": 0.5, "test_probs": "x", "seconds": 1.0}
    with session_scope() as session:
        lifecycle.complete_cached(session, weak.id, record | {"key": weak.stage_key}, "mem")
    assert not any(stages_of(job_id)[s.kind].ready for s in students)  # its features are not there yet
    with session_scope() as session:
        lifecycle.complete_cached(session, ceiling.id, record | {"key": ceiling.stage_key}, "mem")
    assert all(stages_of(job_id)[s.kind].ready for s in students)


def test_full_fine_tuning_students_stay_on_gpus(
    client: TestClient, make_team, tiny_bert: Path, gpu_deployment: dict[str, int]
) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=make_team().headers).json()[
        "id"
    ]
    plan_job_task(job_id)
    for stage in stages_of(job_id).values():
        assert stage.gpu_class == "gpu-24g" and stage.features_from_id is None


def running_stage(job_id: str, kind: str, queue: str) -> str:
    stage = stages_of(job_id)[kind]
    with session_scope() as session:
        row = session.get(Stage, stage.id)
        assert row is not None
        row.status, row.gpu_class, row.attempts, row.worker = "queued", queue, 0, None
    return stage.id


def test_out_of_memory_moves_a_stage_one_class_up_then_fails_naming_every_class(
    client: TestClient,
    make_team,
    tiny_bert: Path,
    gpu_deployment: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=make_team().headers).json()[
        "id"
    ]
    plan_job_task(job_id)
    ran_on: list[str] = []

    def out_of_memory(plan: Any, stage_id: str, *args: Any, **kwargs: Any) -> Any:
        with session_scope() as session:
            ran_on.append(session.scalar(select(Stage.gpu_class).where(Stage.id == stage_id)))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tasks, "run_plan", out_of_memory)
    stage_id = running_stage(job_id, "weak", "gpu-24g")
    settings = get_settings()
    assert execute_stage(stage_id, worker="w", settings=settings) == "pending"
    stage = stages_of(job_id)["weak"]
    assert (stage.status, stage.gpu_class) == ("pending", "gpu-80g")  # waits for a larger card
    assert stage.ready and job_of(job_id).status in ("queued", "running")

    with session_scope() as session:
        lifecycle.admit_stage(session, stage_id, "gpu-80g")
    assert execute_stage(stage_id, worker="w", settings=settings) == "failed"
    assert ran_on == ["gpu-24g", "gpu-80g"]  # once per class, never twice on one
    job = job_of(job_id)
    assert job.status == "failed"
    assert "every class tried: gpu-24g (24 GiB), gpu-80g (80 GiB)" in job.error
    assert "minibatch_size" in job.error
    with session_scope() as session:
        messages = session.scalars(select(LogLine.message).where(LogLine.stage_id == stage_id)).all()
    assert any("moved to gpu-80g" in message for message in messages)


class OutOfMemoryLoss:
    """A loss whose first call runs out of memory, as a too-large probe stage does on a GPU."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")


def test_an_error_in_the_long_lived_process_lets_go_of_the_model_before_memory_is_released(
    client: TestClient, make_team, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import w2s.stages

    heads: list[weakref.ref[torch.nn.Module]] = []

    class TrackedHead(w2s.stages.ProbeHead):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            heads.append(weakref.ref(self))

    alive_at_release: list[int] = []
    monkeypatch.setattr(w2s.stages, "ProbeHead", TrackedHead)
    monkeypatch.setattr(
        tasks,
        "_release_accelerator_memory",
        lambda: alive_at_release.append(sum(h() is not None for h in heads)),
    )
    with registered_losses(oom=OutOfMemoryLoss):
        body = tiny_job(tiny_bert, tiny_bert, losses=["oom"])
        for role in ("weak", "strong"):
            body[role]["mode"] = "probe"
        job_id = client.post("/v1/jobs", json=body, headers=make_team().headers).json()["id"]
        outcome = Steps().run(job_id)
    gc.collect()
    assert outcome["status"] == "failed" and "out of memory" in outcome["error"]
    assert heads and alive_at_release and alive_at_release[-1] == 0  # the failed stage's head was gone


def test_dev_gives_every_gpu_worker_a_gpu_of_its_own() -> None:
    workers = stage_workers({"gpu-80g": 2, "gpu-24g": 1, "cpu": 1}, GPU_CLASSES, ["0", "1", "2", "3"])
    gpus = [env["CUDA_VISIBLE_DEVICES"] for queue, env in workers if queue != "cpu"]
    assert sorted(gpus) == ["0", "1", "2"] and len(set(gpus)) == 3
    assert [env["CUDA_VISIBLE_DEVICES"] for queue, env in workers if queue == "cpu"] == [""]
    with pytest.raises(ValueError, match="asks for 3 GPU worker"):
        stage_workers({"gpu-80g": 2, "gpu-24g": 1}, GPU_CLASSES, ["0"])
