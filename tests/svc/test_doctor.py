"""`w2s-service doctor` and GET /v1/admin/doctor: each invariant the lifecycle keeps, broken by hand
in the rows, is found and named; overdue work is repaired by one dispatch round; a healthy service
shows nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_KEY
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service import doctor
from service.db import session_scope
from service.models import Job, LogLine, Stage, utcnow
from service.settings import get_settings
from service.states import StageStatus
from svc_support import Steps, tiny_job
from w2s_service import cli
from worker import tasks
from worker.control import plan_job_task

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def submit(client: TestClient, team: Any, tiny_bert: Path) -> str:
    response = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def planned(job_id: str) -> None:
    """Plan the job through the round and its control task, as the service does."""
    report = Steps().round()
    for planned_id, token in report.plan:
        plan_job_task(planned_id, token)
    with session_scope() as session:
        assert session.scalar(select(Job.planned).where(Job.id == job_id))


def findings(grace_s: float = 60.0) -> list[tuple[str, str, bool]]:
    with session_scope() as session:
        result = doctor.checkup(session, get_settings(), grace_s=grace_s)
    return [(finding.job_id, finding.problem, finding.wedged) for finding in result.findings]


def change(model: Any, where: Any, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(model).where(where).values(**values))


def test_a_healthy_service_shows_nothing(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_bert)
    assert findings() == []
    planned(job_id)
    assert findings() == []
    assert Steps().run(job_id)["status"] == "succeeded"
    assert findings() == []
    response = client.get("/v1/admin/doctor", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"healthy": True, "checked_jobs": 0, "findings": []}


@pytest.mark.parametrize(
    ("breakage", "problems"),
    [
        ("stages_left", {"stages_left"}),
        ("ready", {"ready", "nothing_due"}),
        ("failed_stage", {"failed_stage"}),
        ("ended_with_waiting", {"ended_with_waiting_stages"}),
    ],
)
def test_each_broken_invariant_is_named(
    client: TestClient, make_team, tiny_bert: Path, breakage: str, problems: set[str]
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_bert)
    planned(job_id)
    if breakage == "stages_left":
        change(Job, Job.id == job_id, stages_left=99)
    elif breakage == "ready":  # the weak stage, planned and with no dependency, marked not ready
        change(Stage, (Stage.job_id == job_id) & Stage.depends_on_id.is_(None), ready=False)
    elif breakage == "failed_stage":
        change(Stage, (Stage.job_id == job_id) & Stage.depends_on_id.is_not(None), status=StageStatus.failed)
    else:
        change(Job, Job.id == job_id, status="cancelled")
    found = findings()
    assert {problem for _, problem, _ in found} == problems
    assert all(wedged and found_job == job_id for found_job, _, wedged in found)

    # The CLI says the same, and exits 2 (wedged).
    assert cli.main(["doctor"]) == 2
    response = client.get("/v1/admin/doctor", headers=ADMIN)
    body = response.json()
    assert body["healthy"] is False
    assert {finding["problem"] for finding in body["findings"]} == problems
    assert all(finding["detail"] and finding["job_id"] == job_id for finding in body["findings"])


def test_overdue_work_is_found_and_one_round_repairs_it(
    client: TestClient, make_team, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    settings = get_settings()
    long_ago = utcnow() - dt.timedelta(hours=1)
    team = make_team()

    # A running stage whose worker went silent an hour ago.
    silent = submit(client, team, tiny_bert)
    planned(silent)
    Steps().round()  # admits the weak stage
    with session_scope() as session:
        weak = session.scalar(select(Stage.id).where(Stage.job_id == silent, Stage.depends_on_id.is_(None)))
    assert tasks.claim_stage(weak, "gone-worker", settings) is not None
    change(Stage, Stage.id == weak, heartbeat_at=long_ago)
    # Planning due for an hour and never leased: the dispatcher has not been running.
    waiting = submit(client, make_team(), tiny_bert)
    change(Job, Job.id == waiting, created_at=long_ago)
    change(LogLine, LogLine.job_id == waiting, created_at=long_ago)

    found = findings()
    assert (waiting, "planning_overdue", False) in found
    assert (silent, "stage_silent", False) in found
    assert cli.main(["doctor", "--json"]) == 1  # overdue only: nothing wedged
    assert '"planning_overdue"' in capsys.readouterr().out

    Steps().round()  # the reconciler: leases planning, requeues the lost stage
    assert findings() == []


def test_the_admin_endpoint_needs_the_admin_key(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert client.get("/v1/admin/doctor").status_code == 401
    assert client.get("/v1/admin/doctor", headers=team.headers).status_code == 403
    response = client.get("/v1/admin/doctor?grace_s=-1", headers=ADMIN)
    assert response.status_code == 422 and "grace_s" in response.text
