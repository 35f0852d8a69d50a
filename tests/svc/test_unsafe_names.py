"""Terminal injection (issue 28, item 9): a name holding ESC, CR, LF or bidi controls is refused by
every endpoint that takes a name, and every command line prints such a name (an old row may hold
one) with the characters escaped, never raw."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_KEY
from sqlalchemy import text

from service.db import get_engine

# The issue's name: reverses the line, paints it red, starts a new line and overwrites its start.
ISSUE_NAME = "\u202e\x1b[31mRED\x1b[0m\nline2\rX"
ESCAPED = "\\u202e\\x1b[31mRED\\x1b[0m\\nline2\\rX"  # how every command line shows it
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROWS = "".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(12)).encode()


def job_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2-medium"},
        "losses": ["xent"],
        "seeds": [0],
    }
    return {**body, **overrides}


def assert_no_raw_controls(output: str) -> None:
    for char in ("\x1b", "\r", "\u202e", "\u2066", "\u200b", "\x07"):
        assert char not in output, f"{char!r} reached the terminal: {output!r}"


def assert_refused(response: httpx.Response, loc: list[str | int]) -> None:
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert isinstance(problems, list)
    (problem,) = [item for item in problems if item["loc"] == loc]
    assert "U+202E RIGHT-TO-LEFT OVERRIDE" in problem["msg"] and "remove" in problem["msg"]


def test_names_with_control_characters_are_refused_by_the_live_api(live_api: str, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    with httpx.Client(base_url=live_api, headers=team.headers, timeout=30) as api:
        assert_refused(api.post("/v1/jobs", json=job_body(name=ISSUE_NAME)), ["body", "name"])
        as_yaml = yaml.safe_dump(job_body(name=ISSUE_NAME)).encode()
        refused = api.post("/v1/jobs", content=as_yaml, headers={"Content-Type": "application/yaml"})
        assert_refused(refused, ["body", "name"])
        sweep = {"name": ISSUE_NAME, "dataset": {"name": "sst2"}, "weak_models": ["gpt2"]}
        assert_refused(
            api.post("/v1/sweeps", json={**sweep, "strong_models": ["gpt2-medium"]}), ["body", "name"]
        )
        upload = api.post("/v1/datasets", files={"file": ("d.jsonl", ROWS)}, data={"name": ISSUE_NAME})
        assert_refused(upload, ["body", "name"])
        # A model id is shown in every listing too.
        evil_model = job_body(weak={"model": "gpt2\u202e"})
        assert_refused(api.post("/v1/jobs", json=evil_model), ["body", "weak", "model"])
        assert_refused(
            api.post(f"/v1/teams/{team.team_id}/keys", json={"name": ISSUE_NAME}, headers=ADMIN),
            ["body", "name"],
        )
        patch = api.patch(
            f"/v1/admin/teams/{team.team_id}", json={"wandb_project": ISSUE_NAME}, headers=ADMIN
        )
        assert_refused(patch, ["body", "wandb_project"])
        # Names in any script, emoji and punctuation stay welcome.
        kept = api.post("/v1/jobs", json=job_body(name="résumé 日本語 — שלום 🚀"))
        assert kept.status_code == 201, kept.text
        assert kept.json()["name"] == "résumé 日本語 — שלום 🚀"
        listed = api.get("/v1/jobs").json()["data"]
    assert [job["name"] for job in listed] == ["résumé 日本語 — שלום 🚀"]  # nothing refused was stored


def job_with_an_old_unsafe_name(client, make_team) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A job whose name, dataset label and team name hold the issue's characters, as rows written
    before names were checked may: written straight into the database."""
    team = make_team()
    response = client.post("/v1/jobs", json=job_body(name="plain"), headers=team.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    with get_engine().begin() as connection:
        connection.execute(
            text("UPDATE jobs SET name = :name WHERE id = :id"), {"name": ISSUE_NAME, "id": job_id}
        )
        connection.execute(
            text("UPDATE teams SET name = :name WHERE id = :id"),
            {"name": f"t{ISSUE_NAME}", "id": team.team_id},
        )
        connection.execute(
            text("UPDATE api_keys SET name = :name WHERE team_id = :id"),
            {"name": ISSUE_NAME, "id": team.team_id},
        )
    return job_id, team.key


def test_admin_cli_prints_an_old_unsafe_name_escaped(
    client, make_team, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from w2s_service.cli import main

    job_id, _ = job_with_an_old_unsafe_name(client, make_team)
    capsys.readouterr()
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out
    assert_no_raw_controls(out)
    (line,) = [line for line in out.splitlines() if job_id in line]  # one line: no LF from the name
    assert line.endswith(ESCAPED) and f"t{ESCAPED}" in line

    assert main(["teams"]) == 0
    teams = capsys.readouterr().out
    assert_no_raw_controls(teams)
    assert f"t{ESCAPED}" in teams

    # The team is found by its (escaped) id; its key's label is escaped too.
    team_id = next(line.split()[1] for line in teams.splitlines() if line.startswith(f"t{ESCAPED}"))
    assert main(["keys", team_id]) == 0
    keys = capsys.readouterr().out
    assert_no_raw_controls(keys)
    assert ESCAPED in keys

    # An error that echoes what was typed is escaped as well.
    assert main(["keys", ISSUE_NAME]) == 2
    assert_no_raw_controls(capsys.readouterr().err)


def test_w2s_list_prints_an_old_unsafe_name_escaped(
    client, make_team, live_api: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from w2s_service.user_cli import main

    job_id, key = job_with_an_old_unsafe_name(client, make_team)
    with get_engine().begin() as connection:  # a dataset label and a model id from before the checks
        connection.execute(
            text("UPDATE jobs SET dataset = :evil, weak_model = :evil WHERE id = :id"),
            {"evil": "d\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "id": job_id},
        )
    monkeypatch.setenv("W2S_URL", live_api)
    monkeypatch.setenv("W2S_API_KEY", key)
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert_no_raw_controls(out)
    (line,) = [line for line in out.splitlines() if job_id in line]
    # The listing folds whitespace (LF, CR) into spaces, as it always did; ESC and U+202E show.
    assert "\\u202e\\x1b[31mRED\\x1b[0m line2 X" in line and "\\x1b]8;;http://evil" in line

    # An error message that echoes the request (an unknown job id) is escaped.
    assert main(["results", "\x1b[2J\u202eabc"]) == 2
    assert_no_raw_controls(capsys.readouterr().err)


def test_watch_lines_escape_a_stage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``w2s watch`` shows a failed stage's error, which quotes what the job was given."""
    from rich.console import Console

    from w2s_service.user_cli import StageBars, StageLines

    stage = {"id": "s1", "kind": "weak", "seed": 0, "status": "failed", "step": 0, "total_steps": 10}
    stage["error"] = f"cannot load model {ISSUE_NAME}"
    assert_no_raw_controls(StageBars.describe(stage, {}))
    console = Console(file=None, force_terminal=False)
    lines = StageLines(console)
    lines.say(StageLines.text(stage, {}))
    out = capsys.readouterr().out
    assert_no_raw_controls(out)
    assert "RED" in out


def test_the_dashboard_isolates_an_old_unsafe_name(client, make_team) -> None:  # type: ignore[no-untyped-def]
    """The dashboard escapes HTML already; a bidi override in an old name is kept inside a <bdi>
    element, so it cannot reverse the status badge or the text around it."""
    from svc_support import login

    job_id, key = job_with_an_old_unsafe_name(client, make_team)
    login(client, key)
    page = client.get(f"/jobs/{job_id}").text
    heading = page[page.index("<h1") : page.index("</h1>")]
    assert "<bdi>\u202e" in heading and heading.index("</bdi>") < heading.index("badge")
    listing = client.get("/").text
    assert "<bdi>\u202e" in listing and "<bdi>t\u202e" in listing  # the job list and the team's name
