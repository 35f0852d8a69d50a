"""Bootstrapping chains through the service: validation names chain fields, the stages follow the
library's layout, and a chain job runs through a real worker, sharing stages with ordinary jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db import session_scope
from service.models import Stage
from svc_support import Stack, finished, login, tiny_job, wait_for


def chain_job(weak: Path, middle: Path, strong: Path) -> dict[str, object]:
    body = tiny_job(weak, strong, losses=["xent", "product"])
    body["chain"] = [{"model": str(middle), "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}]
    return body


def test_a_chain_job_lays_out_its_stages_and_dependencies(
    client: TestClient, make_team, tiny_bert: Path, tiny_gpt2: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = client.post("/v1/jobs", json=chain_job(tiny_bert, tiny_gpt2, tiny_bert), headers=team.headers)
    assert response.status_code == 201, response.text
    job = response.json()
    assert [s["kind"] for s in job["stages"]] == [
        "weak",
        "ceiling",
        "student:xent",
        "student:product",
        "ceiling@2",
        "chain@2:xent",
        "chain@3:xent",
        "chain@2:product",
        "chain@3:product",
    ]
    with session_scope() as session:
        stages = {s.id: s for s in session.scalars(select(Stage).where(Stage.job_id == job["id"]))}
        by_kind = {s.kind: s for s in stages.values()}
        supervisor = {
            s.kind: stages[s.depends_on_id].kind if s.depends_on_id else None for s in stages.values()
        }
    assert supervisor["chain@2:xent"] == "weak" and supervisor["chain@3:xent"] == "chain@2:xent"
    assert supervisor["ceiling@2"] is None and supervisor["student:product"] == "weak"
    assert by_kind["chain@3:product"].depends_on_id == by_kind["chain@2:product"].id


def test_chain_models_are_checked_like_weak_and_strong(
    client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert)
    body["chain"] = ["/etc", {"model": str(tiny_bert), "lr": 7}]
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 422
    fields = [".".join(str(part) for part in error["loc"]) for error in response.json()["detail"]]
    assert fields == ["body.chain.0.model"], response.text  # outside the model roots: checked first
    body["chain"] = [str(tiny_bert), {"model": str(tiny_bert), "lr": 7}]
    response = client.post("/v1/jobs", json=body, headers=team.headers)
    assert response.status_code == 422
    assert [error["loc"][-3:] for error in response.json()["detail"]] == [["chain", 1, "lr"]]


@pytest.mark.slow
def test_a_chain_runs_through_a_worker_and_reuses_ordinary_stages(
    stack: Stack, client: TestClient, make_team, tiny_bert: Path, tiny_gpt2: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = client.post("/v1/jobs", json=tiny_job(tiny_bert, tiny_gpt2), headers=team.headers)
    ordinary_id = response.json()["id"]
    ordinary = wait_for(lambda: finished(client, team.headers, ordinary_id), 240, stack, "the ordinary job")
    assert ordinary["status"] == "succeeded", stack.logs()
    body = chain_job(tiny_bert, tiny_gpt2, tiny_bert)
    body["losses"] = ["xent"]
    chain_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]
    job = wait_for(lambda: finished(client, team.headers, chain_id), 300, stack, "the chain job")
    assert job["status"] == "succeeded", stack.logs()

    stages = {s["kind"]: s for s in job["stages"]}
    before = {s["kind"]: s for s in ordinary["stages"]}
    # The same computations: the weak stage, and model 2's ceiling (the ordinary job's ceiling).
    assert stages["weak"]["status"] == "cached" and stages["weak"]["stage_key"] == before["weak"]["stage_key"]
    assert stages["ceiling@2"]["status"] == "cached"
    assert stages["ceiling@2"]["stage_key"] == before["ceiling"]["stage_key"]

    chain = job["results"]["chain"]
    assert chain["models"] == [str(tiny_bert), str(tiny_gpt2), str(tiny_bert)]
    hops = chain["losses"]["xent"]["hops"]
    assert len(hops) == 2
    assert hops[0]["ceiling_figures"]["accuracy"] == pytest.approx(ordinary["results"]["ceiling"]["accuracy"])
    middle = stages["chain@2:xent"]["metrics"]["accuracy"]
    assert hops[1]["supervisor_figures"]["accuracy"] == pytest.approx(middle)
    ends = chain["losses"]["xent"]["end_to_end"]
    assert ends["direct"]["accuracy"] == pytest.approx(job["results"]["students"]["xent"]["accuracy"])

    login(client, team.key)
    html = client.get(f"/jobs/{chain_id}").text
    assert "Bootstrapping chain · xent" in html and "tiny-bert → tiny-gpt2" in html
    assert "direct: tiny-bert → tiny-bert" in html
