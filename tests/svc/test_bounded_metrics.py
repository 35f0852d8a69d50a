"""Bounded curves in the service: a long stage stores a few thousand points per curve as it trains,
and its readers get the shape plus the exact minimum, maximum and last value (issue: batch size 1 ×
20 epochs wrote 175k rows and took 3.3 s to read)."""

from __future__ import annotations

import math
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db import session_scope
from service.models import MetricPoint, Stage
from svc_support import tiny_job
from w2s.train import Progress
from worker.control import plan_job_task
from worker.tasks import ProgressWriter


def running_weak_stage(client: TestClient, team, model: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    job_id = client.post("/v1/jobs", json=tiny_job(model, model), headers=team.headers).json()["id"]
    plan_job_task(job_id)
    with session_scope() as session:
        stage = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        stage.status, stage.attempts, stage.fence = "running", 1, 1
        return job_id, stage.id


def test_a_long_stage_stores_bounded_curves_and_reads_exact_figures(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id, stage_id = running_weak_stage(client, team, tiny_bert)
    total, max_points = 20_000, 200
    writer = ProgressWriter(stage_id, flush_s=0.05, fence=1, max_points=max_points)
    losses = [2.0 * math.exp(-step / 4_000) + 0.01 * math.sin(step) for step in range(1, total + 1)]
    losses[12_345] = 7.5  # one spike a stride would miss
    for step, loss in enumerate(losses, start=1):
        evaluation = 0.5 + step / (4 * total) if step % 1_000 == 0 else None
        writer(Progress(step, total, loss, 0.5, 1e-3, evaluation))
    writer.final_flush(5.0)

    with session_scope() as session:
        rows = session.scalar(select(func.count()).where(MetricPoint.stage_id == stage_id))
    assert rows <= 4 * max_points  # loss, train_accuracy, lr, eval_accuracy

    body = client.get(f"/v1/jobs/{job_id}/metrics", headers=team.headers).json()
    loss = next(s for s in body["series"] if s["stage_id"] == stage_id and s["name"] == "loss")
    assert len(loss["steps"]) <= max_points
    assert loss["points_seen"] == total
    assert (loss["min"], loss["max"]) == (min(losses), max(losses))
    assert (loss["last_step"], loss["last"]) == (total, losses[-1])
    assert 7.5 in loss["values"] and loss["steps"][-1] == total
    evaluation = next(s for s in body["series"] if s["stage_id"] == stage_id and s["name"] == "eval_accuracy")
    assert evaluation["steps"] == list(range(1_000, total + 1, 1_000))  # sparse curves are kept whole

    thin = client.get(f"/v1/jobs/{job_id}/metrics?max_points=50", headers=team.headers).json()
    thin_loss = next(s for s in thin["series"] if s["stage_id"] == stage_id and s["name"] == "loss")
    assert len(thin_loss["steps"]) <= 50 and 7.5 in thin_loss["values"]
    assert (thin_loss["min"], thin_loss["max"], thin_loss["last"]) == (loss["min"], loss["max"], loss["last"])

    refused = client.get(f"/v1/jobs/{job_id}/metrics?max_points=1", headers=team.headers)
    assert refused.status_code == 422 and "max_points" in refused.text


def test_a_new_attempt_starts_its_curves_afresh(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    from service import lifecycle

    team = make_team()
    job_id, stage_id = running_weak_stage(client, team, tiny_bert)
    writer = ProgressWriter(stage_id, flush_s=0.0, fence=1, max_points=100)
    for step in range(1, 51):
        writer(Progress(step, 100, 9.0, 0.5, 1e-3))
    with session_scope() as session:  # the attempt is lost; the next one claims the stage
        session.get_one(Stage, stage_id).status = "queued"
    with session_scope() as session:
        claim = lifecycle.claim_stage(session, stage_id, "w2", max_attempts=3, heartbeat_timeout_s=60)
    assert claim is not None
    second = ProgressWriter(stage_id, flush_s=0.0, fence=claim.fence, max_points=200)
    for step in range(1, 11):
        second(Progress(step, 100, 1.0, 0.5, 1e-3))
    body = client.get(f"/v1/jobs/{job_id}/metrics", headers=team.headers).json()
    loss = next(s for s in body["series"] if s["name"] == "loss")
    assert loss["max"] == 1.0 and loss["points_seen"] == 10 and loss["steps"] == list(range(1, 11))
