"""Specs as YAML: the CLI reads YAML files, and POST now takes them too (issue: YAML worked in the
CLI but POST accepted only JSON)."""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from svc_support import tiny_job

YAML = {"Content-Type": "application/yaml"}


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
