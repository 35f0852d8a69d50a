"""One team's tracking server that accepts connections and never answers costs that team's exports,
never anyone's planning or finishing (issue 28, item 5), on the real stack: Postgres, Redis, the
dispatcher and real Celery workers (cpu, control and exports).

Before, exports ran on the control queue: six exports of one team's finished jobs to such a server
held both control processes for minutes, and another team's new job waited that long to be planned.
Now they run on a queue and worker of their own, at most ``W2S_EXPORTS_PER_TEAM`` of a team's at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from export_support import SilentServer, silent_server
from service.db import session_scope
from service.models import Job, JobExport, Team
from svc_support import Stack, finished, tiny_job, wait_for

pytestmark = pytest.mark.slow  # real worker and dispatcher processes

CAP = 2  # W2S_EXPORTS_PER_TEAM
FLOOD = 6  # the team's finished jobs, each with an export to the dead server
# A try against the dead server lasts this long (it never answers): far longer than this test needs
# on the fixed code, so any try that ended before the other team's job was planned is one it waited on.
REQUEST_TIMEOUT_S = "300"


@pytest.fixture
def dead_server_settings(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings for the stack's processes (requested before ``stack``, which starts them)."""
    for name, value in {
        "W2S_EXPORTS_PER_TEAM": str(CAP),
        "W2S_EXPORT_CONCURRENCY": str(2 * CAP),  # room for more than the cap: the cap is what holds
        "W2S_EXPORT_REQUEST_TIMEOUT_S": REQUEST_TIMEOUT_S,
        "W2S_EXPORT_REQUEST_RETRIES": "0",
        # The same bound where MLflow's client reads it (the code before this fix read only these).
        "MLFLOW_HTTP_REQUEST_TIMEOUT": REQUEST_TIMEOUT_S,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }.items():
        monkeypatch.setenv(name, value)


def set_team(team_id: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Team).where(Team.id == team_id).values(**values))


def planned(job_id: str) -> bool:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job is not None and bool(job.planned)


def exports_of(team_id: str) -> list[tuple[int, bool]]:
    """(tries started, a try holds its lease now) of each of the team's exports."""
    with session_scope() as session:
        rows = session.execute(
            select(JobExport.attempts, JobExport.token).where(JobExport.team_id == team_id)
        ).all()
    return [(attempts, token is not None) for attempts, token in rows]


def no_try_ended(server: SilentServer) -> bool:
    return server.accepted > 0 and server.open == server.accepted


def test_a_dead_tracking_server_holds_that_teams_exports_never_another_teams_planning(
    dead_server_settings: None,
    stack: Stack,
    client: TestClient,
    make_team,
    tiny_bert: Path,
) -> None:  # type: ignore[no-untyped-def]
    stack.start("worker", "--queue", "exports")
    alpha, beta = make_team(), make_team()
    with silent_server() as server:
        set_team(alpha.team_id, mlflow_tracking_uri=server.uri)
        body = tiny_job(tiny_bert, tiny_bert)
        body["weak"]["mode"] = body["strong"]["mode"] = "probe"
        # Duplicates: the first job computes, the others finish at once from its results.
        flood = [client.post("/v1/jobs", json=body, headers=alpha.headers).json()["id"] for _ in range(FLOOD)]
        wait_for(lambda: server.open == CAP, 180, stack, f"{CAP} exports waiting on the dead server")

        beta_job = client.post("/v1/jobs", json={**body, "seeds": [1]}, headers=beta.headers).json()["id"]
        wait_for(lambda: planned(beta_job), 120, stack, "beta's job to be planned")
        # Planned while alpha's exports still wait on the dead server: it waited on none of them.
        assert no_try_ended(server), (server.accepted, server.open)
        for job_id in flood:  # alpha's own jobs finish too: their exports never hold a job
            job = wait_for(lambda j=job_id: finished(client, alpha.headers, j), 120, stack, "alpha's jobs")
            assert job["status"] == "succeeded", job["error"]
        job = wait_for(lambda: finished(client, beta.headers, beta_job), 240, stack, "beta's job to finish")
        assert job["status"] == "succeeded", job["error"]
        assert no_try_ended(server), (server.accepted, server.open)

        # Never more than the cap at once; the rest of alpha's exports wait their turn, unsent.
        assert server.most == CAP
        alpha_exports = exports_of(alpha.team_id)
        assert len(alpha_exports) == FLOOD
        assert sum(in_flight for _, in_flight in alpha_exports) == CAP
        assert sum(attempts == 0 for attempts, _ in alpha_exports) == FLOOD - CAP
