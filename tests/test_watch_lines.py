"""``w2s watch`` without a terminal (output to a file or a pipe) writes a line per change as it
happens (issue: it printed nothing until the job ended, and 0 bytes when stopped by a timeout)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from w2s_service.user_cli import follow


class FakeClient:
    """The API's answers to a watch, one poll at a time."""

    def __init__(self, polls: list[list[dict[str, Any]]], statuses: list[str]):
        self.polls, self.statuses = polls, statuses
        self.seen: list[str] = []

    def get_job(self, job_id: str) -> dict[str, Any]:
        stages, status = self.polls.pop(0), self.statuses.pop(0)
        return {"id": job_id, "status": status, "stages": stages}

    def job_metrics(self, job_id: str) -> dict[str, Any]:
        return {"series": []}


def stage(status: str, step: int = 0, **metrics: Any) -> dict[str, Any]:
    return {
        "id": "s1",
        "kind": "weak",
        "seed": 0,
        "status": status,
        "step": step,
        "total_steps": 10,
        "metrics": metrics,
    }


def test_each_change_is_a_line_written_as_it_happens(capsys: pytest.CaptureFixture[str]) -> None:
    polls = [
        [stage("queued")],
        [stage("queued")],  # no change: no line
        [stage("running", 3, loss=0.69)],
        [stage("succeeded", 10, accuracy=0.75)],
    ]
    written: list[str] = []

    def sleep(_: float) -> None:  # between polls: what a reader of the file sees by now
        written.append(capsys.readouterr().err)

    job = follow(
        FakeClient(polls, ["queued", "queued", "running", "succeeded"]), "j1", interval=0, sleep=sleep
    )
    written.append(capsys.readouterr().err)
    assert job["status"] == "succeeded"
    lines = [line for chunk in written for line in chunk.splitlines()]
    assert [line.split(" ", 1)[1] for line in lines] == [
        "weak (seed 0): 0/10 queued",
        "weak (seed 0): 3/10 loss 0.6900",
        "weak (seed 0): 10/10 test acc 0.7500  done",
    ]
    assert written[0] and not written[1]  # the first line was out before the second poll


def test_feature_extraction_says_how_many_texts_of_how_many() -> None:
    import io

    from rich.console import Console

    from w2s_service.user_cli import StageLines

    out = io.StringIO()
    lines = StageLines(Console(file=out, width=200))
    extracting = {**stage("running", 1200), "total_steps": 4000}
    extracting["metrics"] = {"phase": "features", "split": "half B", "rows_per_s": 310.4}
    lines.update({"status": "running", "stages": [extracting]}, {})
    said = out.getvalue().split(" ", 1)[1].rstrip("\n")
    assert said == "weak (seed 0): features of half B: 1200 of 4000 texts, 310 texts/s"


def test_a_quiet_job_still_gets_a_line_every_ten_seconds() -> None:
    """Nothing changes while a model loads or on a slow machine: a line says what is still running,
    so no wait is silent for longer than StageLines.QUIET_S (issue: silent waits read as stuck)."""
    import io

    from rich.console import Console

    from w2s_service.user_cli import StageLines

    now = [0.0]
    out = io.StringIO()
    lines = StageLines(Console(file=out, width=200), clock=lambda: now[0])
    job = {"status": "running", "stages": [{**stage("running"), "total_steps": None, "started_at": None}]}
    for t in (0.0, 4.0, 9.0, 10.5, 15.0, 21.0):
        now[0] = t
        if t == 21.0:  # the server's start time, by now known
            started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=21.2)
            job["stages"][0]["started_at"] = started.isoformat()
        lines.update(job, {})
    said = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert said == [
        "weak (seed 0): running",  # t=0: the change
        "still running: weak (seed 0)",  # t=10.5: quiet since 0
        "still running: weak (seed 0) for 21 s",  # t=21: quiet since 10.5; started 21 s ago
    ]
    queued = {"status": "queued", "stages": [{**stage("pending"), "id": "s2"}]}
    now[0] = 40.0
    lines.update(queued, {})  # a new stage: its own line
    now[0] = 51.0
    lines.update(queued, {})
    assert out.getvalue().splitlines()[-1].split(" ", 1)[1] == "still waiting: job queued, being planned"
