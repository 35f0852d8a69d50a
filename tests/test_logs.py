"""JSON log lines carry the ids of the work they are about (service/logs.py)."""

from __future__ import annotations

import json
import logging

import pytest

from service.logs import configure_logging, log_context


@pytest.fixture
def restored_logging():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_name_the_job_and_stage_they_are_about(
    restored_logging, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    configure_logging("json", force=True)
    log = logging.getLogger("worker.tasks")
    with log_context(job_id="job-1"), log_context(stage_id="stage-9"):
        log.info("attempt %d started", 1)
    log.warning("outside any work")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert (
        first["message"] == "attempt 1 started"
        and first["level"] == "info"
        and first["logger"] == "worker.tasks"
    )
    assert (first["job_id"], first["stage_id"]) == ("job-1", "stage-9")
    assert "job_id" not in second and second["level"] == "warning"
    assert "ValueError: boom" in third["exception"]


def test_text_stays_the_default(restored_logging, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    configure_logging("text", force=True)
    logging.getLogger("w2s").info("plain")
    assert capsys.readouterr().err.rstrip().endswith("w2s INFO plain")
