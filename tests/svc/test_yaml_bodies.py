"""Specs as YAML: the CLI reads YAML files, and POST now takes them too (issue: YAML worked in the
CLI but POST accepted only JSON).

Issue 28, item 4: YAML bodies were parsed in the event loop before authentication, without limits:
``a: [[[[...]]]]`` at depth 5,000 (10 KB, no key) blocked every request, /healthz too, for 13 s and
answered 500 with a 214 KB traceback line in the log; a flat 1 MiB list blocked 40 s. Now the key is
checked first, the parse runs in a thread and stops at the first value past a depth or count limit."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import httpx
import yaml
from fastapi.testclient import TestClient

from api.yaml_bodies import MAX_DEPTH, MAX_VALUES
from svc_support import tiny_job

YAML = {"Content-Type": "application/yaml"}
MIB = 1024 * 1024
DEEP = b"a: " + b"[" * 5000 + b"]" * 5000  # the 10 KB
DEEPER = b"a: " + b"[" * 10_000 + b"]" * 10_000
SHALLOW_BUT_TOO_DEEP = b"a: " + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
FLAT = b"[" + b"1," * ((MIB - 100) // 2) + b"1]"  # a flat list just under the 1 MiB body limit


def test_a_yaml_spec_is_a_job_like_its_json(client: TestClient, make_team, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = yaml.safe_dump(tiny_job(tiny_bert, tiny_bert) | {"name": "from yaml"})
    created = client.post("/v1/jobs", content=body, headers=team.headers | YAML)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "from yaml"
    wrong = client.post(
        "/v1/jobs",
        content=yaml.safe_dump(tiny_job(tiny_bert, tiny_bert, losses=["nope"])),
        headers=team.headers | YAML,
    )
    assert wrong.status_code == 422 and "losses" in wrong.text  # named like a JSON body's error


def test_bad_yaml_says_where_and_aliases_are_refused(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    broken = client.post("/v1/jobs", content=b"dataset: {name: sst2\nweak: x\n", headers=team.headers | YAML)
    assert broken.status_code == 422
    assert broken.json()["detail"][0]["msg"].startswith("not valid YAML: line ")
    bomb = b"a: &a [x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n"
    refused = client.post("/v1/sweeps", content=bomb, headers=team.headers | YAML)
    assert refused.status_code == 422 and "aliases" in refused.text
    latin = client.post("/v1/jobs", content="name: caf\xe9\n".encode("latin-1"), headers=team.headers | YAML)
    assert latin.status_code == 422 and "UTF-8" in latin.text


def test_hostile_yaml_is_refused_without_freezing_the_api(live_api: str, make_team, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    made_up = {"Authorization": f"Bearer w2s_{secrets.token_urlsafe(32)}"}
    answers: dict[str, int] = {}
    with httpx.Client(base_url=live_api, timeout=60) as attacker:

        def attack() -> None:
            for name, body in (("deep", DEEP), ("deeper", DEEPER), ("flat", FLAT)):
                for who, headers in (("no key", {}), ("made-up key", made_up)):
                    answers[f"{name}, {who}"] = attacker.post(
                        "/v1/jobs", content=body, headers=YAML | headers
                    ).status_code

        attacking = threading.Thread(target=attack)
        attacking.start()
        # While the bodies arrive, the API answers everyone else: before, /healthz waited 13 s per body.
        with httpx.Client(base_url=live_api, timeout=5) as others:
            while attacking.is_alive():
                assert others.get("/healthz").status_code == 200
                assert others.get("/v1/jobs", headers=team.headers).status_code == 200
        attacking.join()
    assert answers and set(answers.values()) == {401}, answers

    with httpx.Client(base_url=live_api, timeout=60) as client:
        # Without a key the body is not even read as YAML: a broken document is a 401, not a 422.
        assert client.post("/v1/jobs", content=b"dataset: {name: [", headers=YAML).status_code == 401
        # With a key: 400 naming the limit, for whatever libyaml or our walk meets first.
        for body in (DEEP, DEEPER, SHALLOW_BUT_TOO_DEEP):
            refused = client.post("/v1/sweeps", content=body, headers=YAML | team.headers)
            assert refused.status_code == 400, refused.text
            assert f"nested more than {MAX_DEPTH} levels" in refused.json()["detail"]
        refused = client.post("/v1/jobs", content=FLAT, headers=YAML | team.headers)
        assert refused.status_code == 400 and f"more than {MAX_VALUES} values" in refused.json()["detail"]
        # A spec at the limits is still read (and judged by the spec's validation, as JSON is).
        nested_ok = b"name: x\nextra: " + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
        assert client.post("/v1/jobs", content=nested_ok, headers=YAML | team.headers).status_code == 422
        assert client.get("/healthz").status_code == 200
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" not in log and max(map(len, log.splitlines()), default=0) < 2000, log[-3000:]
