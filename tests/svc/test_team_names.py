"""Confusable team names (issue 28, item 11): a name that looks like a taken one, in another script,
with a trailing space, in other case or with a slash, is refused or collides, through the API and
the CLI; and two racing creations of one name in two cases make one team."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ADMIN_KEY
from sqlalchemy import select

from service.auth import create_team
from service.db import session_scope
from service.errors import Conflict
from service.models import Team

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# The four look-alikes of "alpha", and how each is answered.
CYRILLIC = "\u0430lpha"  # U+0430 CYRILLIC SMALL LETTER A, then Latin "lpha"
REFUSED = {CYRILLIC: "U+0430 CYRILLIC SMALL LETTER A", "al/pha": "U+002F SOLIDUS"}
COLLIDING = ("alpha ", "ALPHA", "\uff41\uff4c\uff50\uff48\uff41")  # trailing space, case, full width


def test_confusable_names_are_refused_or_collide_through_the_live_api(live_api: str) -> None:
    with httpx.Client(base_url=live_api, headers=ADMIN, timeout=30) as api:
        first = api.post("/v1/teams", json={"name": "alpha"})
        assert first.status_code == 201, first.text
        for name, character in REFUSED.items():
            response = api.post("/v1/teams", json={"name": name})
            assert response.status_code == 422, response.text
            (problem,) = response.json()["detail"]
            assert problem["loc"] == ["body", "name"]
            assert character in problem["msg"] and "ASCII letters, digits" in problem["msg"]
        for name in COLLIDING:
            response = api.post("/v1/teams", json={"name": name})
            assert response.status_code == 409, response.text
            assert "is taken by team 'alpha'" in response.json()["detail"], response.text
        teams = api.get("/v1/admin/teams").json()
    assert [team["name"] for team in teams] == ["alpha"]


def test_confusable_names_are_refused_or_collide_through_the_cli(
    service_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from w2s_service.cli import main

    assert main(["create-team", "alpha"]) == 0
    for name, character in REFUSED.items():
        capsys.readouterr()
        assert main(["create-team", name]) == 2
        assert character in capsys.readouterr().err
    for name in COLLIDING:
        capsys.readouterr()
        assert main(["create-team", name]) == 2
        assert "is taken by team 'alpha'" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["teams"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 1 and listing[0].startswith("alpha ")
    assert main(["create-key", "ALPHA", "--name", "ci"]) == 0  # found as uniqueness compares names
    assert "team alpha (" in capsys.readouterr().out


def test_a_name_is_normalised_before_it_is_stored(client) -> None:  # type: ignore[no-untyped-def]
    created = client.post("/v1/teams", json={"name": "  \uff36ision-2 "}, headers=ADMIN)  # full-width V
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "Vision-2"
    for name, fix in (
        (".hidden", "start with a letter or digit"),
        ("x" * 65, "at most 64"),
        ("a b", "'-' or '_'"),
    ):
        response = client.post("/v1/teams", json={"name": name}, headers=ADMIN)
        assert response.status_code == 422 and fix in response.text, response.text


def test_an_uncommitted_creation_makes_the_other_case_wait_and_fail(service_env: dict[str, str]) -> None:
    """The database decides, not a check before the insert: while one transaction holds "Alpha"
    (uncommitted), a creation of "alpha" waits on the unique index, then fails once it commits."""
    name = f"Alpha-{uuid.uuid4().hex[:6]}"
    outcome: list[BaseException | str] = []

    def create_lower() -> None:
        try:
            with session_scope() as session:
                outcome.append(create_team(session, name=name.lower()).id)
        except Conflict as error:
            outcome.append(error)

    with session_scope() as holder:
        create_team(holder, name=name)
        holder.flush()
        racer = threading.Thread(target=create_lower)
        racer.start()
        racer.join(timeout=1.0)
        assert racer.is_alive(), "the second creation did not wait for the first"
    racer.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert f"taken by team {name!r}" in str(outcome[0])
    with session_scope() as session:
        assert session.scalars(select(Team.name).where(Team.name_key == name.lower())).all() == [name]


def test_racing_creations_through_the_api_make_one_team(live_api: str) -> None:
    names = [f"Race-{uuid.uuid4().hex[:6]}" for _ in range(8)]
    start = threading.Barrier(2)

    def create(name: str) -> int:
        with httpx.Client(base_url=live_api, headers=ADMIN, timeout=30) as api:
            api.get("/healthz")  # connected before the barrier: the two posts leave together
            start.wait()
            return api.post("/v1/teams", json={"name": name}).status_code

    with ThreadPoolExecutor(2) as pool:
        for name in names:
            statuses = sorted(pool.map(create, [name, name.lower()]))
            assert statuses == [201, 409], (name, statuses)
    with httpx.Client(base_url=live_api, headers=ADMIN, timeout=30) as api:
        keys = [team["name"].lower() for team in api.get("/v1/admin/teams").json()]
    assert sorted(keys) == sorted(name.lower() for name in names)
