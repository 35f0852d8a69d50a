"""Preemption, drain and resume with real processes: Celery workers, the dispatcher and a private
Redis on the test's Postgres (tests/svc/test_faults.py's Cluster). A stage taken off its worker three
ways (SIGTERM, `w2s-service drain`, kill -9) ends with the weights and metrics of an uninterrupted
run; a team below its fair share gets the only slot within the grace period, and the preempted job
still succeeds."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_support import wait_until
from sqlalchemy import select
from test_faults import Cluster, assert_complete_curves, assert_no_duplicate_rows, long_job
from test_preemption import events as stage_events

from service.auth import create_api_key, create_team
from service.db import session_scope
from service.models import Stage, StageEvent
from service.states import StageEventKind
from w2s.resume import CheckpointPolicy
from w2s.stages import plan_from_record, run_stage
from w2s.store import ArtifactStore
from w2s_service.cli import main

pytestmark = pytest.mark.slow  # real worker processes stopped three ways, and a preemption

GRACE_S = 20.0
WAITING = ("pending", "queued")


@pytest.fixture
def cluster(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    running = Cluster(
        service_env,
        tmp_path,
        monkeypatch,
        overrides={
            "W2S_CHECKPOINT_EVERY_STEPS": "25",
            "W2S_CHECKPOINT_EVERY_S": "0",
            "W2S_PREEMPT_MIN_RUN_S": "2",
            "W2S_PREEMPT_GRACE_S": str(GRACE_S),
        },
    )
    yield running
    running.close()


def weak_stage(cluster: Cluster, job_id: str) -> dict[str, Any]:
    return next(stage for stage in cluster.job(job_id)["stages"] if stage["kind"] == "weak")


def events(stage_id: str) -> list[tuple[str, int | None]]:
    return [(kind, step) for kind, step in stage_events(stage_id) if kind != StageEventKind.checkpoint]


def all_events(stage_id: str) -> list[tuple[Any, ...]]:
    with session_scope() as session:
        return [
            tuple(row)
            for row in session.execute(
                select(StageEvent.at, StageEvent.kind, StageEvent.step, StageEvent.detail)
                .where(StageEvent.stage_id == stage_id)
                .order_by(StageEvent.id)
            )
        ]


def training_past(cluster: Cluster, job_id: str, step: int, checkpoint: bool = False) -> dict[str, Any]:
    def far_enough() -> dict[str, Any] | None:
        stage = weak_stage(cluster, job_id)
        done = (stage["checkpoint_step"] or 0) if checkpoint else stage["step"]
        return stage if stage["status"] == "running" and done >= step else None

    return dict(wait_until(far_enough, 180, f"the weak stage past step {step}", cluster.processes.logs))


def test_a_stage_stopped_by_sigterm_a_drain_and_kill_9_resumes_each_time_and_ends_as_if_never_stopped(
    cluster: Cluster, service_env: dict[str, str], tiny_bert: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    body = long_job(tiny_bert, tiny_gpt2, long_stage="weak")
    body["weak"] |= {"epochs": 60, "save_checkpoint": True, "train_dropout": True}  # 600 steps
    cluster.start_dispatcher()
    cluster.start_worker("worker-1")
    job_id = cluster.submit(body)

    # 1. SIGTERM to the worker (Celery's warm shutdown): its stage writes a checkpoint and yields.
    before = training_past(cluster, job_id, 30)
    os.kill(cluster.processes.processes["worker-1"].pid, signal.SIGTERM)
    assert cluster.processes.processes.pop("worker-1").wait(timeout=60) == 0
    yielded = weak_stage(cluster, job_id)
    # Waiting for a worker again (the dispatcher admits it at once: the slot is free), no step lost.
    assert yielded["status"] in WAITING and yielded["checkpoint_step"] >= before["step"]

    # 2. `w2s-service drain` of the next worker, from anywhere: the same, and the worker exits.
    cluster.start_worker("worker-2")
    running = training_past(cluster, job_id, yielded["checkpoint_step"] + 30)
    assert main(["drain", running["worker"]]) == 0
    assert cluster.processes.processes.pop("worker-2").wait(timeout=60) == 0
    drained = weak_stage(cluster, job_id)
    assert drained["status"] in WAITING and drained["checkpoint_step"] >= running["step"]

    # 3. kill -9 of the third, after a periodic checkpoint: the steps since it are all that is lost.
    cluster.start_worker("worker-3")
    killed_at = training_past(cluster, job_id, drained["checkpoint_step"] + 30, checkpoint=True)
    cluster.processes.kill("worker-3")
    cluster.start_worker("worker-4")
    job = cluster.wait_finished(job_id, timeout=300)
    assert job["status"] == "succeeded", cluster.processes.logs()

    weak = weak_stage(cluster, job_id)
    resumed = [step for kind, step in events(weak["id"]) if kind == StageEventKind.resumed]
    assert resumed[:2] == [yielded["checkpoint_step"], drained["checkpoint_step"]], all_events(weak["id"])
    assert resumed[2] >= killed_at["checkpoint_step"]
    assert [kind for kind, _ in events(weak["id"])][:6] == [
        StageEventKind.drain_asked,  # SIGTERM drains the worker itself
        StageEventKind.yielded,
        StageEventKind.resumed,
        StageEventKind.drain_asked,
        StageEventKind.yielded,
        StageEventKind.resumed,
    ]
    assert weak["attempts"] == 2  # the two yields gave their attempts back; the killed one is spent
    assert_no_duplicate_rows(job)
    assert_complete_curves(job)

    # The same stage run uninterrupted, by the library, in a store of its own: identical.
    store = ArtifactStore(service_env["W2S_ARTIFACT_STORE"])
    with session_scope() as session:
        row = session.get(Stage, weak["id"])
        assert row is not None and row.plan is not None and row.result is not None
        plan, result = plan_from_record(row.plan, store), row.result
    reference_store = ArtifactStore(str(tmp_path / "uninterrupted"))
    reference = run_stage(plan, reference_store, checkpoint_policy=CheckpointPolicy(0, 0))
    assert (result["accuracy"], result["auroc"], result["steps"]) == (
        reference.accuracy,
        reference.auroc,
        reference.steps,
    )
    assert store.get_bytes(result["test_probs"]) == reference_store.get_bytes(reference.test_probs)
    assert store.get_bytes(result["soft_labels"]) == reference_store.get_bytes(reference.soft_labels)
    ours = torch.load(io.BytesIO(store.get_checkpoint(result["checkpoint"])), weights_only=True)
    theirs = torch.load(io.BytesIO(reference_store.get_checkpoint(reference.checkpoint)), weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_team_below_its_fair_share_gets_the_slot_within_the_grace_period(
    cluster: Cluster, tiny_bert: Path, tiny_gpt2: Path
) -> None:
    """One slot. The cluster's team (weight 1) runs a long stage; a team of weight 3 submits: its fair
    share is 3/4 of the slot, so the long stage writes a checkpoint and yields to it, and resumes
    once the other job's stages are done."""
    with session_scope() as session:
        owner = create_team(session, name="owner", weight=3.0)
        _, key = create_api_key(session, team=owner)
    owner_headers = {"Authorization": f"Bearer {key}"}
    cluster.start_dispatcher()
    cluster.start_worker("worker-1")
    borrower_job = cluster.submit(long_job(tiny_bert, tiny_gpt2, long_stage="weak"))
    training_past(cluster, borrower_job, 20)

    submitted = time.monotonic()
    response = cluster.client.post(
        "/v1/jobs",
        json=long_job(tiny_bert, tiny_gpt2, long_stage="none") | {"seeds": [1]},
        headers=owner_headers,
    )
    assert response.status_code == 201, response.text
    owner_job = response.json()["id"]

    def owner_running() -> bool:
        stages = cluster.client.get(f"/v1/jobs/{owner_job}", headers=owner_headers).json()["stages"]
        return any(stage["status"] in ("running", "succeeded") for stage in stages)

    wait_until(owner_running, 120, "the owner's first stage to run", cluster.processes.logs)
    waited = time.monotonic() - submitted
    print(f"submit -> first stage running: {waited:.1f} s (grace {GRACE_S:.0f} s)")
    assert waited < GRACE_S, cluster.processes.logs()

    owner = cluster.client.get(f"/v1/jobs/{owner_job}", headers=owner_headers).json()
    assert owner["status"] in ("running", "succeeded")
    done = cluster.wait_finished(borrower_job, timeout=300)
    assert done["status"] == "succeeded", cluster.processes.logs()
    weak = weak_stage(cluster, borrower_job)
    assert (weak["preemptions"], weak["attempts"]) == (1, 1)
    kinds = events(weak["id"])
    assert [kind for kind, _ in kinds] == [
        StageEventKind.preempt_asked,
        StageEventKind.yielded,
        StageEventKind.resumed,
    ]
    assert kinds[1][1] == kinds[2][1] and kinds[1][1] >= 20  # resumed where it yielded
    assert_complete_curves(done)
    owners = cluster.client.get(f"/v1/jobs/{owner_job}", headers=owner_headers).json()
    deadline = time.monotonic() + 120
    while owners["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        owners = cluster.client.get(f"/v1/jobs/{owner_job}", headers=owner_headers).json()
    assert owners["status"] == "succeeded"
