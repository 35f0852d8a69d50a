"""A hostile upload cannot make planning quadratic (issue 28, item 6): 60,000 rows that all share
their longest word took the overlap check 103 s to plan, and some 200,000 rows (9 MB, under the
upload limit) would have run past the control task's time limit. The search indexed each row under
its longest word, so here it compared every row with every other; w2s.overlap now reads each row
a bounded number of times. 150,000 such rows (7 MB) are planned by the real control worker under a
time limit the old search ran past, and exactly the rows the overlap rules name are removed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import session_scope
from service.models import Job
from svc_support import Stack, tiny_job, wait_for
from w2s.datasets import DatasetSplits
from w2s.spec import parse_spec
from w2s.splits import load_drawn

ROWS = 150_000
LONGEST_WORD = "incomprehensibilities"
# The control task's limit here. On a 2-core machine the old search needed 45 s to prepare 60,000
# such rows and, growing with their square, some 280 s for these; the new one prepares them in
# about 8 s (bench/overlap_scale.py times both).
CONTROL_TIMEOUT_S = 120


@pytest.fixture
def service_env(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("W2S_CONTROL_TIMEOUT_S", str(CONTROL_TIMEOUT_S))
    return {**service_env, "W2S_CONTROL_TIMEOUT_S": str(CONTROL_TIMEOUT_S)}


def hostile_rows() -> list[dict[str, Any]]:
    """Pairs of rows "<longest> film k" and "<longest> film k again": every row's longest word is
    the same, and each row of a pair's second kind contains the first (no other row contains one)."""
    return [
        {"text": f"{LONGEST_WORD} film {i // 2}" + (" again" if i % 2 else ""), "label": (i // 2) % 2}
        for i in range(ROWS)
    ]


def expected_removals(drawn: DatasetSplits) -> dict[str, int]:
    """Rows the overlap rules remove, from how the rows were built: a half's "... again" row whose
    pair is in the test set (it contains a test row), then a half-B row whose "... again" pair is
    still in half A (it sits inside a half-A row)."""
    test = set(drawn.test.texts)

    def contains_a_test_row(text: str) -> bool:
        return text.endswith(" again") and text.removesuffix(" again") in test

    a_gone = {text for text in drawn.train_a.texts if contains_a_test_row(text)}
    b_gone = {text for text in drawn.train_b.texts if contains_a_test_row(text)}
    a_left = set(drawn.train_a.texts) - a_gone
    b_in_a = {text for text in drawn.train_b.texts if text not in b_gone and f"{text} again" in a_left}
    return {"train_a": len(a_gone), "train_b": len(b_gone) + len(b_in_a), "test": 0}


def planned_or_failed(job_id: str) -> Job | None:
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
    return job if job.planned or job.status == "failed" else None


@pytest.mark.slow
def test_rows_sharing_their_longest_word_are_planned_within_the_control_limit(
    stack: Stack, live_api: str, make_team, tiny_bert: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    upload = tmp_path / "hostile.jsonl"
    upload.write_text("".join(json.dumps(row) + "\n" for row in hostile_rows()))
    with httpx.Client(base_url=live_api, headers=team.headers, timeout=120) as client:
        uploaded = client.post(
            "/v1/datasets", files={"file": ("hostile.jsonl", upload.read_bytes())}, data={"name": "hostile"}
        )
        assert uploaded.status_code == 201, uploaded.text
        # No n_train / n_test: every row, a fifth held out as the test set.
        body = tiny_job(tiny_bert, tiny_bert, dataset={"name": f"upload:{uploaded.json()['id']}"})
        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        job = wait_for(lambda: planned_or_failed(job_id), CONTROL_TIMEOUT_S + 120, stack, "planning to end")
        client.post(f"/v1/jobs/{job_id}/cancel")  # its stages would train on 60,000 rows each

    assert job.error is None and job.planned, job.error
    splits = job.data_summary["datasets"]["0"]["splits"]
    local = tiny_job(tiny_bert, tiny_bert, dataset={"name": {"path": str(upload)}})
    drawn = load_drawn(parse_spec(local), None, train_seed=0)
    assert {name: splits[name]["overlap_removed"] for name in splits} == expected_removals(drawn)
    assert all(split["dropped_too_long"] == 0 for split in splits.values())
    assert splits["train_a"]["rows"] + splits["train_a"]["overlap_removed"] == len(drawn.train_a)
    assert splits["train_b"]["rows"] + splits["train_b"]["overlap_removed"] == len(drawn.train_b)
