"""bench/report.py: a missing, failing or skipping benchmark becomes "not run: <reason>" and the page
still renders, with its targets, the recorded figures and the hand-written sections."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    path = ROOT / "bench" / "report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BENCH", tmp_path / "bench")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    (tmp_path / "bench").mkdir()
    return module


def _bench(report: ModuleType, name: str) -> object:
    return next(bench for bench in report.BENCHMARKS if bench.name == name)


def test_missing_failing_and_skipping_scripts_are_not_run(report: ModuleType, tmp_path: Path) -> None:
    missing = report.run_benchmark(_bench(report, "api_load"), quick=True, timeout_s=60)
    assert missing["status"] == "not run" and missing["reason"] == "bench/api_load.py is missing"

    (tmp_path / "bench" / "fuzz_api.py").write_text("import sys\nsys.exit('database unreachable')\n")
    failed = report.run_benchmark(_bench(report, "fuzz_api"), quick=False, timeout_s=60)
    assert failed["status"] == "not run"
    assert "status 1" in failed["reason"] and "database unreachable" in failed["reason"]

    (tmp_path / "bench" / "gpu_mfu.py").write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--json') + 1]\n"
        "open(out, 'w').write(json.dumps({'skipped': 'no GPU'}))\n"
    )
    skipped = report.run_benchmark(_bench(report, "gpu_mfu"), quick=False, timeout_s=60)
    assert skipped["status"] == "not run" and skipped["reason"] == "skipped: no GPU"

    for record in (missing, failed, skipped):
        report.save(record)
    page = report.render_page(
        {b.name: report.load(b.name) for b in report.BENCHMARKS}, "python bench/report.py"
    )
    assert "**not run: bench/api_load.py is missing**" in page
    assert "**not run: skipped: no GPU**" in page
    assert "| schemathesis: zero server errors | not run: exited with status 1" in page
    assert "## Recorded manually" in page  # docs/benchmarks_manual.md, included verbatim


def test_recorded_figures_render_with_their_targets(report: ModuleType) -> None:
    figures = {
        "fit_examples_per_s": 80.0,
        "bound_examples_per_s": 90.0,
        "ratio": 80 / 90,
        "target_ratio": 0.85,
    }
    record = {"name": "trainer_throughput", "status": "ok", "figures": figures, "machine": report.machine()}
    api = {
        "burst": {"requests": 1000, "jobs_after": 1000, "5xx": 0},
        "read": {"by_id": {"p99_ms": 12.5, "errors": 0}, "listing": {"p99_ms": 61.0, "errors": 0}},
        "listing": {"cases": {"first": {"max_ms": 9.0}, "deep": {"max_ms": 40.0}}},
        "dispatch": {"post_to_running_ms": 900.0},
    }
    records = {
        "trainer_throughput": record,
        "api_load": {"name": "api_load", "status": "ok", "figures": api, "machine": report.machine()},
    }
    page = report.render_page(records, "python bench/report.py")
    assert "| fit ≥ 85% of the packed bound | 88.9% | ✅ met | §1 |" in page
    assert (
        "| 1000 idempotent POSTs, sent twice → exactly 1000 jobs | 1000 jobs after 1,000 keys × 2; 0 5xx"
        in page
    )
    assert "worst p99 61.0 ms (listing.p99_ms); 0 errors | ❌ missed" in page
    assert "slowest 40.0 ms (cases.deep.max_ms) | ✅ met" in page
    assert "| POST → first stage running < 2 s | post_to_running_ms 900 ms | ✅ met |" in page


def test_race_storm_figures_render_with_their_goals(report: ModuleType) -> None:
    figures = {
        "minutes": 1,
        "clients": 20,
        "teams": 4,
        "backlog_quota": 12,
        "slots": {"cpu": 2},
        "requests": 1500,
        "responses": {"submit 201": 90, "submit 429": 300, "cancel 202": 150},
        "server_errors": 0,
        "transport_errors": 0,
        "kills": {"dispatcher": 2, "worker-cpu-0": 1},
        "kills_total": 3,
        "jobs": 90,
        "end_states": {"cancelled": 70, "succeeded": 20},
        "settle_s": 56.0,
        "stuck_jobs": 0,
        "doctor_findings": 0,
        "quota": {
            "samples": 200,
            "backlog_max": 12,
            "in_flight_max": 2,
            "backlog_overshoot": 0,
            "slot_overshoot": 1,
        },
        "attempts": {
            "attempts": 60,
            "overlapping_pairs": 3,
            "by_cause": {"the job was retried (the old attempt stops at its next step)": 3},
            "unexplained": 0,
            "longest_overlap_s": 1.5,
            "superseded_outcomes_discarded": 4,
        },
        "retried_afterwards": {"retried": 4, "succeeded": 4},
        "reader": {"reads": 500, "failures": 0, "p50_ms": 20.0, "p99_ms": 250.0, "max_ms": 400.0},
    }
    records = {
        "race_storm": {"name": "race_storm", "status": "ok", "figures": figures, "machine": report.machine()}
    }
    page = report.render_page(records, "python bench/report.py")
    assert "| stuck jobs = 0 | 0 | ✅ met |" in page
    assert "| quota overshoot = 0 | 1 | ❌ missed |" in page
    assert "| another team's read p99 < 200 ms | 250.0 ms | ❌ missed |" in page
    assert "| processes killed (SIGKILL) | 3 (dispatcher 2, worker-cpu-0 1) |" in page
