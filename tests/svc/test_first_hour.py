"""What a newcomer or an operator meets in the first hour: clear refusals instead of late failures,
state found wherever a command runs, progress while features are computed, reused stages that
say what they reused."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db import session_scope
from service.models import Stage, Team
from service.settings import get_settings
from svc_support import tiny_job
from w2s.train import ExtractionProgress
from worker.control import plan_job_task
from worker.tasks import ProgressWriter, execute_stage


def fields(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {".".join(str(p) for p in item["loc"][1:]): item["msg"] for item in response.json()["detail"]}


def test_a_dataset_missing_from_the_data_dir_is_refused_at_submission(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    errors = fields(
        client.post(
            "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, dataset={"name": "imdb"}), headers=team.headers
        )
    )
    assert "imdb" in errors["dataset.name"] and "W2S_DATA_DIR" in errors["dataset.name"]


def test_a_hub_model_that_cannot_load_offline_is_refused_at_submission(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"] = {"model": "EleutherAI/pythia-70m"}  # not in this service's cache; the hub is off
    errors = fields(client.post("/v1/jobs", json=body, headers=team.headers))
    assert "cannot be reached" in errors["weak.model"] and "model roots" in errors["weak.model"]
    body["weak"] = {"model": "gpt2"}  # in the cache: it loads offline
    assert client.post("/v1/jobs", json=body, headers=team.headers).status_code == 201


def test_a_relative_model_path_means_the_same_directory_for_every_process(
    client: TestClient, make_team, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Relative to W2S_PATH_BASE (the checkout by default), which every process shares, and never to
    a process's working directory, which differs between the API, the workers and their hosts."""
    from service.db import reset_caches

    monkeypatch.setenv("W2S_PATH_BASE", str(tiny_bert.parent))
    reset_caches()
    team = make_team()
    monkeypatch.chdir("/")
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"]["model"] = body["strong"]["model"] = f"./{tiny_bert.name}"
    job = client.post("/v1/jobs", json=body, headers=team.headers).json()
    assert job["spec"]["weak"]["model"] == str(tiny_bert.resolve())


def test_commands_before_migrate_say_run_migrate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.db import reset_caches
    from w2s_service.cli import main

    monkeypatch.delenv("W2S_DATABASE_URL", raising=False)
    monkeypatch.setenv("W2S_STATE_DIR", str(tmp_path / "fresh"))
    monkeypatch.chdir(tmp_path)
    reset_caches()
    try:
        assert main(["create-team", "vision"]) == 2
    finally:
        reset_caches()


def test_dev_refuses_a_busy_port_and_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    from w2s_service.cli import main

    # `dev` marks its process as a development stack; keep that out of the tests that follow.
    monkeypatch.setenv("W2S_ENVIRONMENT", "development")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} .* is in use .* --port"):
            main(["dev", "--port", str(port)])


def test_every_dev_start_prints_a_key_that_works(service_env: dict[str, str]) -> None:
    """The first start creates team "default"; a later start (issue: it printed no key once a team
    existed, so the README's job could not be looked at afterwards) makes a new key for it."""
    from service.auth import team_for_key
    from w2s_service.cli import dev_key_lines

    def key_of(line: str) -> str:
        return line.rsplit(": ", 1)[1]

    with session_scope() as session:
        assert not session.scalars(select(Team)).all()
    first = dev_key_lines()
    assert len(first) == 1 and first[0].startswith("created team 'default'")
    again = dev_key_lines()
    assert again[0].startswith("team 'default' exists; a new API key")
    assert key_of(first[0]) != key_of(again[0])
    with session_scope() as session:
        assert len(session.scalars(select(Team)).all()) == 1  # no second team
        for line in (first[0], again[0]):
            team = team_for_key(session, key_of(line))
            assert team is not None and team.name == "default"  # both keys work


def test_dev_names_the_command_for_a_key_of_another_team(service_env: dict[str, str]) -> None:
    from w2s_service.cli import dev_key_lines, main

    assert main(["create-team", "demo-1"]) == 0  # as scripts/run-example.sh does before `dev`
    lines = dev_key_lines()
    assert lines[0].startswith("team 'demo-1' exists; a new API key")  # no "default": the newest team
    assert main(["create-team", "default"]) == 0
    lines = dev_key_lines()
    assert lines[0].startswith("team 'default' exists")
    assert lines[1] == "other teams: demo-1; a key for one: w2s-service create-key demo-1"


def test_feature_extraction_progress_reaches_the_stage_row(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    job_id = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers).json()["id"]
    plan_job_task(job_id)
    with session_scope() as session:
        stage = session.scalars(select(Stage).where(Stage.job_id == job_id, Stage.kind == "weak")).one()
        stage.status, stage.attempts, stage.fence = "running", 1, 1
        stage_id = stage.id
    writer = ProgressWriter(stage_id, flush_s=0.0, fence=1)
    assert writer(ExtractionProgress("half A", 24, 32, 85.5)) is True
    job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    weak = next(s for s in job["stages"] if s["id"] == stage_id)
    assert (weak["step"], weak["total_steps"]) == (24, 32)
    assert weak["metrics"] == {"phase": "features", "split": "half A", "rows_per_s": 85.5}
    page = client.get(f"/jobs/{job_id}")  # the dashboard says the same (signed out: a redirect)
    assert page.status_code in (200, 303)


def test_a_reused_stage_shows_the_original_time_and_curves(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    settings = get_settings()
    first = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers).json()["id"]
    plan_job_task(first)
    with session_scope() as session:
        weak = session.scalars(select(Stage).where(Stage.job_id == first, Stage.kind == "weak")).one()
        weak.status = "queued"
        weak_id = weak.id
    execute_stage(weak_id, worker="in-process", settings=settings)
    again = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers=team.headers).json()["id"]
    plan_job_task(again)  # its weak stage has the same key: completed from the stored result
    job = client.get(f"/v1/jobs/{again}", headers=team.headers).json()
    reused = next(s for s in job["stages"] if s["kind"] == "weak")
    assert reused["status"] == "cached" and reused["metrics"]["original_seconds"] > 0
    series = client.get(f"/v1/jobs/{again}/metrics", headers=team.headers).json()["series"]
    curves = [s for s in series if s["stage_id"] == reused["id"]]
    assert curves and all(s["reused"] for s in curves) and {s["name"] for s in curves} >= {"loss"}
    assert json.dumps(curves)  # served as is


def test_admin_commands_print_what_they_did_one_way(
    service_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """create-key prints its key as create-team does (one sed recipe reads both), and team-set
    --disable says what it did and nothing about limits it did not touch."""
    from w2s_service.cli import main

    assert main(["create-team", "optics"]) == 0
    created = capsys.readouterr().out
    assert main(["create-key", "optics", "--name", "ci"]) == 0
    added = capsys.readouterr().out
    pattern = r"^api key \(shown once\): (w2s_\S+)$"
    import re

    assert re.search(pattern, created, re.M) and re.search(pattern, added, re.M)
    assert main(["team-set", "optics", "--disable"]) == 0
    said = capsys.readouterr().out
    assert said.strip() == "team optics disabled; 0 open jobs cancelled"
    assert main(["team-set", "optics", "--enable", "--gpu-quota", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["team optics enabled", "team optics: gpu_quota=2"]


def test_times_carry_their_zone_on_the_embedded_database_too(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path
) -> None:
    """created_at had a Z on Postgres and none on SQLite (which keeps no zone): now the same."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from service.auth import create_api_key, create_team
    from service.db import reset_caches
    from w2s_service.cli import main

    monkeypatch.delenv("W2S_DATABASE_URL", raising=False)
    monkeypatch.setenv("W2S_STATE_DIR", str(tmp_path / "embedded"))
    reset_caches()
    try:
        assert main(["migrate"]) == 0
        with session_scope() as session:
            team = create_team(session, name="zone")
            _, key = create_api_key(session, team=team)
        with TestClient(create_app()) as client:
            job = client.post(
                "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert), headers={"Authorization": f"Bearer {key}"}
            )
            assert job.status_code == 201, job.text
            read = client.get(
                f"/v1/jobs/{job.json()['id']}", headers={"Authorization": f"Bearer {key}"}
            ).json()
        assert read["created_at"].endswith("Z") and job.json()["created_at"].endswith("Z")
    finally:  # back on the test's Postgres, which the fixture empties
        monkeypatch.setenv("W2S_DATABASE_URL", service_env["W2S_DATABASE_URL"])
        monkeypatch.setenv("W2S_STATE_DIR", service_env["W2S_STATE_DIR"])
        reset_caches()
