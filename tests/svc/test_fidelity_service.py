"""The service runs the library's method unchanged: a job whose data the library refuses fails with the
library's message, and diverged training fails at once, unretried, with no SQL shown to the user.

Stages run in this process (``execute_stage``) against the real Postgres, one dispatch round at a time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from helpers import registered_losses
from service.db import session_scope
from service.dispatch import dispatch_round
from service.models import Job, Stage
from service.settings import get_settings
from svc_support import tiny_job
from worker.control import finish_job_task, plan_job_task
from worker.tasks import execute_stage


@dataclasses.dataclass(frozen=True)
class NanLoss:
    """Cross entropy that turns NaN after the first step."""

    def __call__(self, logits, labels, step_frac):  # type: ignore[no-untyped-def]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels.float())
        return loss * float("nan") if step_frac > 0 else loss


@pytest.fixture(autouse=True)
def nan_loss() -> Iterator[None]:
    with registered_losses(test_svc_nan=NanLoss):
        yield


def run_rounds(job_id: str, rounds: int = 8) -> dict[str, Any]:
    """Dispatch rounds, running control tasks and admitted stages here, until the job ends."""
    settings = get_settings()
    for _ in range(rounds):
        with session_scope() as session:
            report = dispatch_round(session, settings)
        for job_id_, token in report.plan:
            plan_job_task(job_id_, token)
        for job_id_, token in report.finish:
            finish_job_task(job_id_, token)
        for stage_id, _queue in report.admitted:
            execute_stage(stage_id, worker="in-process", settings=settings)
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.status in ("succeeded", "failed", "cancelled"):
                stages = session.scalars(select(Stage).where(Stage.job_id == job_id)).all()
                return {
                    "status": job.status,
                    "error": job.error,
                    "results": job.results,
                    "stages": {s.kind: (s.status, s.attempts, s.error) for s in stages},
                }
    raise AssertionError(f"job {job_id} did not end in {rounds} rounds")


def test_a_job_dropping_too_many_long_rows_fails_with_the_split_count_and_limit(
    client: TestClient, make_team, tiny_bert: Path, service_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    test_file = Path(service_env["W2S_DATA_DIR"]) / "sst2" / "test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    for row in rows[:20]:  # a third of the 60 test rows become far longer than max_length 32
        row["sentence"] = " ".join(["the movie was long"] * 20) + " " + row["sentence"]
    test_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert, dataset={"name": "sst2", "n_train": 64})
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]
    outcome = run_rounds(job_id)
    assert outcome["status"] == "failed"
    assert "20 of 60 test rows" in outcome["error"] and "max_length 32" in outcome["error"]
    assert "max_dropped_fraction" in outcome["error"]


def test_non_finite_training_fails_once_without_retry_or_sql(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, losses=["test_svc_nan"]), headers=team.headers
    ).json()["id"]
    outcome = run_rounds(job_id)
    assert outcome["status"] == "failed"
    status, attempts, error = outcome["stages"]["student:test_svc_nan"]
    assert (status, attempts) == ("failed", 1)
    assert error.startswith("loss became non-finite at step 2 of")
    assert "non-finite" in outcome["error"]
    for text in (error, outcome["error"]):
        assert not any(word in text for word in ("SELECT", "INSERT", "UPDATE", "sqlalchemy", "psycopg"))
    page = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    assert "non-finite" in page["error"]


def test_a_finished_job_reports_its_data_and_pgr_uncertainty(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, seeds=[0, 1]), headers=team.headers
    ).json()["id"]
    outcome = run_rounds(job_id, rounds=10)
    assert outcome["status"] == "succeeded", outcome
    results = outcome["results"]
    data = results["data"]
    assert data["resample_per_seed"] is True and [entry["seed"] for entry in data["per_seed"]] == [0, 1]
    assert set(data["splits"]) == {"train_a", "train_b", "test"}
    assert "pgr_undefined_share" in results["students"]["xent"]
    assert "ceiling_minus_weak_ci" in results["gap"]
