"""Keys across a fleet: workers register their runtime (library versions and w2s code, what stage
keys hash); the dispatcher sends a stage only where a live worker can compute its planner's key and
otherwise says why it waits; a worker that cannot reproduce a plan hands the stage back without
spending an attempt (issue: one host on another build failed a student with 'no stored soft labels')."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.db import session_scope
from service.models import Job, LogLine, Stage, Worker
from service.settings import get_settings
from service.workers import register_worker
from svc_support import Steps, tiny_job
from worker.control import plan_job_task
from worker.tasks import TransientStageError, execute_stage


def planned_job(client: TestClient, team: Any, model: Path) -> str:
    job_id = client.post("/v1/jobs", json=tiny_job(model, model), headers=team.headers).json()["id"]
    assert plan_job_task(job_id) == "done"
    return str(job_id)


def test_a_stage_waits_for_a_worker_that_computes_its_planners_keys(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = planned_job(client, make_team(), tiny_bert)
    with session_scope() as session:
        runtime = session.get_one(Job, job_id).runtime
        register_worker(
            session,
            name="cpu-1@old-host",
            queues=["cpu"],
            runtime="0123456789abcdef",
            versions={"torch": "2.12.0", "transformers": "4.0.0", "code": "aaaa"},
        )
    assert runtime
    report = Steps().round()
    assert not [stage for stage, _ in report.admitted]
    with session_scope() as session:
        weak = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        assert weak.status == "pending"
        assert "no live worker on queue 'cpu' runs what this job was planned with" in (weak.error or "")
        assert "torch 2.12.0" in weak.error
        logs = session.scalars(select(LogLine.message).where(LogLine.job_id == job_id)).all()
    assert sum(line.startswith("weak/0: waiting: no live worker") for line in logs) == 1  # said once
    Steps().round()
    with session_scope() as session:
        logs = session.scalars(select(LogLine.message).where(LogLine.job_id == job_id)).all()
        assert (
            sum(line.startswith("weak/0: waiting: no live worker") for line in logs) == 1
        )  # not every round
        register_worker(session, name="cpu-2@new-host", queues=["cpu"], runtime=runtime, versions={})
    assert Steps().round().admitted  # a compatible worker is there now


def test_a_worker_that_cannot_reproduce_the_plan_hands_it_back(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = planned_job(client, make_team(), tiny_bert)
    with session_scope() as session:
        weak = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        weak.status = "queued"
        weak.plan = {**weak.plan, "key": "f" * 64}  # what another build of the planner computed
        weak_id = weak.id
    with pytest.raises(TransientStageError):
        execute_stage(weak_id, worker="cpu-9@other-build", settings=get_settings())
    with session_scope() as session:
        stage = session.get_one(Stage, weak_id)
        assert (stage.status, stage.attempts) == ("queued", 0)
        assert (stage.error or "").startswith("not run on cpu-9@other-build:")
        assert session.get_one(Job, job_id).status != "failed"


def test_a_worker_process_registers_itself_and_keeps_reporting(
    service_env: dict[str, str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from service import workers
    from w2s.stages import runtime_id
    from worker.registration import Registration

    monkeypatch.setattr(workers, "REPORT_EVERY_S", 0.1)
    monkeypatch.setattr("worker.registration.REPORT_EVERY_S", 0.1)
    registration = Registration("cpu-77@this-host", ["cpu"])
    registration.start()
    try:
        deadline = time.monotonic() + 20
        first = None
        while time.monotonic() < deadline:
            with session_scope() as session:
                row = session.get(Worker, "cpu-77@this-host")
                if row is not None and first is None:
                    first = row.seen_at
                elif row is not None and row.seen_at > first:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker did not register and report again")
        assert row.runtime == runtime_id() and row.queues == ["cpu"] and "torch" in row.versions
    finally:
        registration.stopped.set()
        registration.join(5)
    with session_scope() as session:  # gone quiet: no longer counted as live
        session.execute(update(Worker).values(seen_at=row.seen_at.replace(year=2000)))


REGISTRATION_IMPORTS = """
import sys, time
import worker.registration as registration
registration.REPORT_EVERY_S = 0.05
from service.db import session_scope
from service.models import Worker

reporter = registration.Registration("cpu-78@this-host", ["cpu"])
reporter.start()
with session_scope() as session:
    assert session.get(Worker, "cpu-78@this-host") is not None, "not registered when start() returned"
before = set(sys.modules)
time.sleep(0.5)  # about ten reports in the background
new = sorted(set(sys.modules) - before)
assert not new, f"the reporting thread imported {new}"
print("ok")
"""


def test_a_worker_registers_before_celery_forks_and_its_thread_imports_nothing(
    service_env: dict[str, str],
) -> None:
    """Celery forks its pool right after the registration starts. A fork while another thread holds
    a module's import lock leaves the pool process hung on that import for good (CI saw a stage
    received and never claimed): so the first report, which imports, runs before start() returns,
    and the later ones import nothing. A fresh interpreter, so that nothing is imported already."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", REGISTRATION_IMPORTS],
        env={**os.environ, **service_env, "PYTHONPATH": str(root)},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_forked_pool_process_builds_its_own_engine(service_env: dict[str, str]) -> None:
    """A Celery pool process must not use the connections (or the pool's locks) its parent's threads
    hold at the fork: it starts with no engine and builds its own (service/db.py)."""
    import os

    from service.db import get_engine

    parent = get_engine()
    with parent.connect() as connection:  # the parent's pool now holds a connection
        connection.exec_driver_sql("select 1")
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's outcome is its exit status)
        try:
            engine = get_engine()
            with engine.connect() as connection:
                connection.exec_driver_sql("select 1")
            os._exit(0 if engine is not parent else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with parent.connect() as connection:  # and the parent's connections still work
        assert connection.exec_driver_sql("select 1").scalar() == 1
