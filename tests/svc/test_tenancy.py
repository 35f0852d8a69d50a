"""One shared cluster, many teams, some careless or hostile: no team can break, stall or hog it.

Against the real Postgres. Dispatch rounds, control tasks and stages run in this process, one step
at a time (``Steps``), so races can be interleaved deterministically.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, insert, select, text, update

from service import lifecycle
from service.db import get_engine, session_scope
from service.dispatch import dispatch_round
from service.models import Job, Stage, TeamUsage, new_id, utcnow
from service.settings import get_settings
from service.states import InvalidTransition
from svc_support import Steps, tiny_job
from worker.control import plan_job_task

ADMIN = {"Authorization": "Bearer test-admin-key"}


@pytest.fixture
def steps(service_env: dict[str, str]) -> Steps:
    return Steps()


def submit(client: TestClient, team: Any, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/jobs", json=body, headers={**team.headers, **headers})


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def stage_statuses(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(Stage.status).where(Stage.job_id == job_id).order_by(Stage.order)))


# ------------------------------------------------------------------------------------------------------
# The round only admits; planning and finishing fail one job alone
# ------------------------------------------------------------------------------------------------------


def test_the_round_loads_no_data_hashes_no_file_and_computes_no_statistics(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert)).json()["id"]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("heavy work inside the dispatch round")

    import w2s.memory
    import w2s.pipeline
    import w2s.splits  # noqa: F401  (imported before patching, so no module binds the stand-in)

    for target in (
        "w2s.datasets.load_splits",
        "w2s.splits.prepare_seed_data",
        "w2s.models.model_fingerprint",
        "w2s.results.build_results",
        "w2s.memory.estimate_memory_gb",
        "w2s.memory.estimate_memory",
    ):
        monkeypatch.setattr(target, forbidden)
    report = steps.round()
    assert [job for job, _ in report.plan] == [job_id] and not report.admitted
    assert steps.round().plan == []  # sent once; sent again only if its task is lost


def test_a_planning_bug_of_any_type_fails_that_job_alone(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    careless, other = make_team(), make_team()
    broken = submit(client, careless, tiny_job(tiny_bert, tiny_bert, seeds=[7])).json()["id"]
    fine = submit(client, other, tiny_job(tiny_bert, tiny_bert)).json()["id"]
    import service.planning as planning

    real = planning.stage_plans

    def buggy(spec: Any, settings: Any, seeds: Any = None, **options: Any) -> Any:
        if 7 in spec.seeds:
            raise KeyError("boom")  # not a type anyone anticipated
        return real(spec, settings, seeds, **options)

    monkeypatch.setattr(planning, "stage_plans", buggy)
    outcome = steps.run(fine)
    assert outcome["status"] == "succeeded"
    failed = job_row(broken)
    assert failed.status == "failed" and failed.error == "cannot plan the job: 'boom'"
    assert set(stage_statuses(broken)) == {"cancelled"}


def test_planning_is_fair_a_big_sweep_never_holds_up_another_teams_job(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps
) -> None:  # type: ignore[no-untyped-def]
    sweeper, other = make_team(), make_team()
    many = [submit(client, sweeper, tiny_job(tiny_bert, tiny_bert, seeds=[s])).json()["id"] for s in range(5)]
    mine = submit(client, other, tiny_job(tiny_bert, tiny_bert)).json()["id"]
    first = dict(steps.round().plan)
    # One task out per team: the sweeper's oldest job and the other team's job, side by side.
    assert sorted(first) == sorted([many[0], mine])
    assert steps.round().plan == []  # both still being planned
    plan_job_task(many[0], first[many[0]])
    assert [job for job, _ in steps.round().plan] == [many[1]]  # the next, once the first is done


def _lapse(job_id: str) -> None:
    with session_scope() as session:  # the lease of seconds lapses
        lapsed = utcnow() - dt.timedelta(seconds=1)
        session.execute(update(Job).where(Job.id == job_id).values(control_lease_until=lapsed))


def test_a_control_task_no_worker_takes_is_sent_again_without_failing_the_job(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps
) -> None:  # type: ignore[no-untyped-def]
    """The control workers are down (or the broker lost the sends): the task is sent again after
    every lease, as long as it takes, and the job runs once a worker takes it."""
    settings = get_settings()
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert)).json()["id"]
    for _ in range(3 * settings.max_control_attempts):
        sent = dict(steps.round().plan)
        assert list(sent) == [job_id]
        assert steps.round().plan == []  # leased: not sent twice
        _lapse(job_id)
    assert job_row(job_id).status == "queued" and job_row(job_id).control_attempts == 0
    token = dict(steps.round().plan)[job_id]
    assert plan_job_task(job_id, token) == "done"


def test_a_control_task_lost_after_starting_is_sent_again_and_then_gives_up(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps
) -> None:  # type: ignore[no-untyped-def]
    """A task that started and was lost (its worker killed mid-task, or stuck) counts; one that keeps
    getting lost (a job that crashes its worker) fails its job, saying so."""
    settings = get_settings()
    job_id = submit(client, make_team(), tiny_job(tiny_bert, tiny_bert)).json()["id"]
    for attempt in range(1, settings.max_control_attempts + 1):
        sent = dict(steps.round().plan)
        assert list(sent) == [job_id]
        with session_scope() as session:  # a control worker starts it, as run_control does; then dies
            assert lifecycle.hold_control(
                session, job_id, "plan", sent[job_id], settings.control_lease_s, starting=True
            )
        assert job_row(job_id).control_attempts == attempt
        assert steps.round().plan == []  # leased: not sent twice
        _lapse(job_id)
    report = steps.round()
    assert report.failed == 1 and report.plan == []
    job = job_row(job_id)
    assert job.status == "failed" and "planning the job started 3 times and did not end" in (job.error or "")


# ------------------------------------------------------------------------------------------------------
# State changes are conditional: a cancel never loses to a concurrent round
# ------------------------------------------------------------------------------------------------------


def _planned_job(client: TestClient, team: Any, tiny_bert: Path) -> str:
    job_id = submit(client, team, tiny_job(tiny_bert, tiny_bert)).json()["id"]
    plan_job_task(job_id)
    return job_id


def _wait_until_blocked(what: str, timeout: float = 10.0) -> None:
    """Until some other connection waits on a row lock (Postgres)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_engine().connect() as connection:
            waiting = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar()
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never waited for the lock")


def test_a_cancel_racing_a_round_that_admits_is_never_undone(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    # The round admits first and holds its rows; the cancel waits, then applies to the new state.
    job_id = _planned_job(client, team, tiny_bert)
    round_session = session_scope()
    session = round_session.__enter__()
    report = dispatch_round(session, get_settings())
    assert report.admitted

    def cancel_now() -> None:
        with session_scope() as other:
            lifecycle.cancel_job(other, job_id)

    cancel = threading.Thread(target=cancel_now)
    cancel.start()
    _wait_until_blocked("the cancel")
    round_session.__exit__(None, None, None)  # the round commits
    cancel.join(10)
    assert job_row(job_id).status == "cancelled"
    assert set(stage_statuses(job_id)) == {"cancelled"}

    # The cancel commits first; the round, which read the stage as ready before, admits nothing.
    job_id = _planned_job(client, team, tiny_bert)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers).status_code == 202
    with session_scope() as session:
        for stage_id in session.scalars(select(Stage.id).where(Stage.job_id == job_id)):
            assert not lifecycle.admit_stage(session, stage_id, "cpu")
    assert job_row(job_id).status == "cancelled" and set(stage_statuses(job_id)) == {"cancelled"}


def test_a_failure_and_a_retry_race_without_losing_either(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = _planned_job(client, team, tiny_bert)
    with session_scope() as session:
        assert lifecycle.fail_job(session, job_id, "stage weak (seed 0) failed: out of memory")
        assert not lifecycle.fail_job(session, job_id, "a second failure changes nothing")
    assert job_row(job_id).error == "stage weak (seed 0) failed: out of memory"
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=team.headers).status_code == 202
    with pytest.raises(InvalidTransition, match="cannot retry a queued job"), session_scope() as session:
        lifecycle.retry_job(session, job_id)
    job = job_row(job_id)
    assert job.status == "queued" and job.error is None
    assert set(stage_statuses(job_id)) == {"pending"}


# ------------------------------------------------------------------------------------------------------
# Fair share across teams; priority only within a team
# ------------------------------------------------------------------------------------------------------


def test_a_priority_100_team_cannot_starve_another(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps
) -> None:  # type: ignore[no-untyped-def]
    hog, quiet = make_team(), make_team()
    hogs = [
        submit(client, hog, tiny_job(tiny_bert, tiny_bert, seeds=[s]) | {"priority": 100}) for s in range(3)
    ]
    modest = submit(client, quiet, tiny_job(tiny_bert, tiny_bert, seeds=[9]) | {"priority": -100})
    for response in [*hogs, modest]:
        assert response.status_code == 201, response.text
        plan_job_task(response.json()["id"])
    with session_scope() as session:  # the hog used a million GPU-seconds today
        session.execute(insert(TeamUsage).values(team_id=hog.team_id, hour=utcnow(), gpu_seconds=1e6))
    report = steps.round()  # one CPU slot
    [(admitted, _)] = report.admitted
    with session_scope() as session:
        assert session.scalar(select(Stage.team_id).where(Stage.id == admitted)) == quiet.team_id


def test_priority_above_the_teams_ceiling_is_refused(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"max_priority": 10}, headers=ADMIN)
    refused = submit(client, team, tiny_job(tiny_bert, tiny_bert) | {"priority": 50})
    assert refused.status_code == 422 and refused.json()["limit"] == "max_priority"
    assert "ceiling of 10" in refused.json()["detail"]
    assert submit(client, team, tiny_job(tiny_bert, tiny_bert) | {"priority": 10}).status_code == 201


# ------------------------------------------------------------------------------------------------------
# Work per round is proportional to free slots, not to the backlog
# ------------------------------------------------------------------------------------------------------


def _backlog(team_id: str, n: int) -> None:
    """n ready, planned stages of one job, inserted directly (fast)."""
    job_id = new_id()
    now = utcnow()
    with session_scope() as session:
        session.execute(
            insert(Job).values(
                id=job_id,
                team_id=team_id,
                status="queued",
                spec={},
                dataset="sst2",
                weak_model="w",
                strong_model="s",
                planned=True,
                created_at=now,
            )
        )
        session.execute(
            insert(Stage),
            [
                {
                    "id": new_id(),
                    "job_id": job_id,
                    "team_id": team_id,
                    "job_created_at": now,
                    "order": i,
                    "kind": f"student:l{i}",
                    "seed": 0,
                    "stage_key": f"{job_id}{i}",
                    "gpu_class": "cpu",
                    "ready": True,
                }
                for i in range(n)
            ],
        )


def _round_cost() -> tuple[int, int]:
    """Statements a round executes and rows they return."""
    statements, rows = [0], [0]

    def count(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        statements[0] += 1
        rows[0] += max(cursor.rowcount, 0) if statement.lstrip().upper().startswith("SELECT") else 0

    engine = get_engine()
    event.listen(engine, "after_cursor_execute", count)
    try:
        with session_scope() as session:
            dispatch_round(session, get_settings())
            session.rollback()  # measure only: admit nothing
    finally:
        event.remove(engine, "after_cursor_execute", count)
    return statements[0], rows[0]


def test_a_rounds_work_does_not_grow_with_the_backlog(make_team) -> None:  # type: ignore[no-untyped-def]
    teams = [make_team() for _ in range(3)]
    for team in teams:
        _backlog(team.team_id, 10)
    small = _round_cost()
    for team in teams:
        _backlog(team.team_id, 3_000)
    large = _round_cost()
    assert large[0] == small[0]  # the same statements...
    assert large[1] <= small[1] + 5  # ...returning about the same rows (bounded by the free slots)


# ------------------------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------------------------


def test_size_limits_are_422_naming_the_limit(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"max_stages_per_job": 10}, headers=ADMIN)
    big = tiny_job(tiny_bert, tiny_bert, seeds=list(range(4)))  # 4 x 3 = 12 stages
    refused = submit(client, team, big)
    assert refused.status_code == 422
    body = refused.json()
    assert body["limit"] == "max_stages_per_job" and "12 stages" in body["detail"] and "10" in body["detail"]

    client.patch(f"/v1/admin/teams/{team.team_id}", json={"max_stages_per_sweep": 5}, headers=ADMIN)
    sweep = {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak_models": [str(tiny_bert)],
        "strong_models": [str(tiny_bert)],
        "seeds": [0, 1],
    }
    refused = client.post("/v1/sweeps", json=sweep, headers=team.headers)
    assert refused.status_code == 422 and refused.json()["limit"] == "max_stages_per_sweep"


def test_oversized_requests_are_refused_before_anything_is_resolved(
    client: TestClient, make_team, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The issue's 6.6 KB sweep (20 x 20 models, 50 losses, 20 seeds: 416,000 stages) and an
    oversized job are refused by arithmetic on the request: no model, loss or dataset is resolved
    (before, every pair was resolved first: 3.2 s of CPU per refusal). bench/abuse.py times it."""
    from service import jobs

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolved before the size check")

    monkeypatch.setattr(jobs, "resolve_spec", never)
    monkeypatch.setattr("service.sweeps.resolve_spec", never)
    team = make_team()
    losses = [{"name": "logconf", "aux_coef": round(0.01 * i, 2)} for i in range(50)]
    sweep = {
        "dataset": {"name": "sst2"},
        "weak_models": [f"no-such-org/weak-{i}" for i in range(20)],
        "strong_models": [f"no-such-org/strong-{i}" for i in range(20)],
        "losses": losses,
        "seeds": list(range(20)),
    }
    refused = client.post("/v1/sweeps", json=sweep, headers=team.headers)
    assert refused.status_code == 422 and refused.json()["limit"] == "max_stages_per_sweep"
    assert "416,000 stages" in refused.json()["detail"]
    job = {
        "dataset": {"name": "sst2"},
        "weak": {"model": "no-such-org/w"},
        "strong": {"model": "no-such-org/s"},
    }
    refused = submit(client, team, {**job, "losses": losses, "seeds": list(range(40))})  # 40 x 52 = 2,080
    assert refused.status_code == 422 and refused.json()["limit"] == "max_stages_per_job"


def test_a_backlog_over_the_limit_is_429_with_retry_after(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"max_queued_stages": 5}, headers=ADMIN)
    assert submit(client, team, tiny_job(tiny_bert, tiny_bert)).status_code == 201  # 3 stages
    refused = submit(client, team, tiny_job(tiny_bert, tiny_bert, seeds=[1]))  # 3 more
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert refused.json()["limit"] == "max_queued_stages"


def test_requests_per_minute_is_429_with_retry_after(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team, other = make_team(), make_team()
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"requests_per_minute": 5}, headers=ADMIN)
    for _ in range(2):  # counts are per minute: if a minute turns mid-test, look again in the next
        minute = int(time.time() // 60)
        statuses = [client.get("/v1/jobs", headers=team.headers).status_code for _ in range(7)]
        if int(time.time() // 60) == minute:
            break
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
    refused = client.get("/v1/jobs", headers=team.headers)
    assert 1 <= int(refused.headers["retry-after"]) <= 61 and refused.json()["limit"] == "requests_per_minute"
    assert client.get("/v1/jobs", headers=other.headers).status_code == 200  # other teams are unaffected


def test_upload_storage_is_limited_and_a_team_can_delete_its_uploads(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team, other = make_team(), make_team()
    rows = "".join(json.dumps({"text": f"row {i} good" * 40, "label": i % 2}) + "\n" for i in range(1200))
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"upload_quota_mb": 1}, headers=ADMIN)

    def upload() -> Any:
        return client.post(
            "/v1/datasets", files={"file": ("data.jsonl", rows.encode())}, headers=team.headers
        )

    first = upload()
    assert first.status_code == 201, first.text
    refused = upload()  # ~0.6 MB each: the second one is over 1 MB
    assert refused.status_code == 422 and refused.json()["limit"] == "upload_quota_mb"
    dataset_id = first.json()["id"]
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=other.headers).status_code == 404
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=team.headers).status_code == 204
    assert upload().status_code == 201  # room again


# ------------------------------------------------------------------------------------------------------
# Models from known places
# ------------------------------------------------------------------------------------------------------


def test_a_model_outside_the_roots_is_refused_alike_whether_or_not_it_exists(
    client: TestClient, make_team
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    answers = []
    for model in ("/etc", "/no/such/place/at/all", "../../../etc"):
        response = submit(client, team, tiny_job(Path(model), Path(model)))
        assert response.status_code == 422
        answers.append([item["msg"] for item in response.json()["detail"]])
    assert answers[0] == answers[1] == answers[2]  # nothing tells whether a path exists


# ------------------------------------------------------------------------------------------------------
# Admin
# ------------------------------------------------------------------------------------------------------


def test_admin_revokes_keys_disables_teams_and_every_action_is_audited(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert client.get("/v1/admin/teams", headers=team.headers).status_code == 403
    job_id = submit(client, team, tiny_job(tiny_bert, tiny_bert)).json()["id"]

    [key] = client.get(f"/v1/admin/teams/{team.team_id}/keys", headers=ADMIN).json()
    second = client.post(f"/v1/teams/{team.team_id}/keys", json={"name": "ci"}, headers=ADMIN).json()
    assert client.delete(f"/v1/admin/keys/{key['id']}", headers=ADMIN).status_code == 204
    assert client.get("/v1/jobs", headers=team.headers).status_code == 401
    spare = {"Authorization": f"Bearer {second['key']}"}
    assert client.get("/v1/jobs", headers=spare).status_code == 200

    disabled = client.patch(f"/v1/admin/teams/{team.team_id}", json={"disabled": True}, headers=ADMIN)
    assert disabled.status_code == 200 and disabled.json()["disabled_at"] is not None
    refused = client.get("/v1/jobs", headers=spare)
    assert (
        refused.status_code == 403 and "your team is disabled" in refused.json()["detail"]
    )  # not "invalid key"
    assert client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=spare).status_code == 403
    assert job_row(job_id).status == "cancelled"
    client.patch(f"/v1/admin/teams/{team.team_id}", json={"disabled": False}, headers=ADMIN)
    assert client.get("/v1/jobs", headers=spare).status_code == 200

    listed = client.get(f"/v1/admin/jobs?team_id={team.team_id}", headers=ADMIN).json()["data"]
    assert [job["id"] for job in listed] == [job_id]
    assert [job["team_id"] for job in client.get("/v1/admin/jobs", headers=ADMIN).json()["data"]] == [
        team.team_id
    ]
    audit = client.get("/v1/admin/audit", headers=ADMIN).json()
    actions = [entry["action"] for entry in audit if entry["target"] in (team.team_id, key["id"])]
    assert {"create_key", "revoke_key", "disable_team", "enable_team"} <= set(actions)


def test_admin_cancels_any_job(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = submit(client, team, tiny_job(tiny_bert, tiny_bert)).json()["id"]
    assert client.post(f"/v1/admin/jobs/{job_id}/cancel", headers=ADMIN).json()["status"] == "cancelled"
    assert client.post(f"/v1/admin/jobs/{job_id}/cancel", headers=ADMIN).status_code == 409
    logs = client.get(f"/v1/jobs/{job_id}/logs", headers=team.headers).json()["data"]
    assert any("by an administrator" in line["message"] for line in logs)


# ------------------------------------------------------------------------------------------------------
# Smaller holes
# ------------------------------------------------------------------------------------------------------


def test_an_idempotency_key_reused_with_another_body_is_refused(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert)
    first = submit(client, team, body, **{"Idempotency-Key": "run-1"})
    again = submit(client, team, body, **{"Idempotency-Key": "run-1"})
    assert (first.status_code, again.status_code) == (201, 200) and again.json()["id"] == first.json()["id"]
    other = submit(client, team, tiny_job(tiny_bert, tiny_bert, seeds=[5]), **{"Idempotency-Key": "run-1"})
    assert other.status_code == 422 and "'run-1'" in other.json()["detail"]


def test_numbers_beyond_float_range_are_422(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert, losses=[{"name": "logconf", "aux_coef": 10**400}])
    refused = submit(client, team, body)
    assert refused.status_code == 422 and "beyond a float's range" in json.dumps(refused.json())


def test_development_secrets_work_only_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    for name in ("W2S_ENVIRONMENT", "W2S_ADMIN_KEY", "W2S_SESSION_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().admin_key == "" and Settings().session_secret == ""
    with pytest.raises(ValueError, match="published development value"):
        Settings(admin_key="dev-admin-key")
    with pytest.raises(ValueError, match="published development value"):
        Settings(environment="production", session_secret="dev-session-secret")
    dev = Settings(environment="development")
    assert (dev.admin_key, dev.session_secret) == ("dev-admin-key", "dev-session-secret")


def test_admin_endpoints_are_off_without_an_admin_key(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.main import create_app
    from service.db import reset_caches

    monkeypatch.setenv("W2S_ADMIN_KEY", "")
    monkeypatch.delenv("W2S_ENVIRONMENT", raising=False)
    reset_caches()
    with TestClient(create_app()) as client:
        for key in ("", "dev-admin-key", "anything"):
            answer = client.get("/v1/admin/teams", headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code in (401, 403)
        assert (
            "no admin key is configured"
            in client.get("/v1/admin/teams", headers={"Authorization": "Bearer x"}).json()["detail"]
        )


@pytest.fixture
def signed_in(client: TestClient, make_team) -> Iterator[tuple[TestClient, Any]]:  # type: ignore[no-untyped-def]
    team = make_team()
    form = client.get("/login").text
    token = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    answer = client.post(
        "/login", data={"api_key": team.key, "csrf": token, "next": "/"}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    yield client, team


def test_sign_out_revokes_the_session_on_the_server(signed_in: tuple[TestClient, Any]) -> None:
    client, _ = signed_in
    cookie = client.cookies.get("w2s_session")
    assert client.get("/", follow_redirects=False).status_code == 200
    assert client.get("/logout", follow_redirects=False).status_code == 405  # POST only
    page = client.get("/").text
    token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert client.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    client.cookies.set("w2s_session", cookie)  # a copy of the cookie taken before signing out
    assert client.get("/", follow_redirects=False).status_code == 303  # to /login


def test_a_new_team_is_not_delayed_by_a_huge_backlog(
    client: TestClient, make_team, tiny_bert: Path, steps: Steps
) -> None:  # type: ignore[no-untyped-def]
    busy = make_team()
    _backlog(busy.team_id, 5_000)
    with session_scope() as session:  # the busy team has used the cluster today
        session.execute(insert(TeamUsage).values(team_id=busy.team_id, hour=utcnow(), gpu_seconds=3600.0))
    newcomer = make_team()
    job_id = submit(client, newcomer, tiny_job(tiny_bert, tiny_bert)).json()["id"]
    plan_job_task(job_id)
    started = time.monotonic()
    report = steps.round()
    elapsed = time.monotonic() - started
    [(admitted, _)] = report.admitted  # the one CPU slot
    with session_scope() as session:
        assert session.scalar(select(Stage.team_id).where(Stage.id == admitted)) == newcomer.team_id
        waiting = session.scalar(select(func.count()).select_from(Stage).where(Stage.team_id == busy.team_id))
    assert waiting == 5_000 and elapsed < 1.0
