"""Exports to Weights & Biases in offline mode (the real wandb client and its wandb-core service),
read back from the run files ``wandb sync`` would upload: each stage a run grouped by the job with its
kind as job type, the spec as config, the curves as history by step, the final figures as summary; a
results run with the job's figures and files. Nothing reaches the network, nothing is printed, and
the API key is written nowhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import export_support as fixture
from export_support import read_run
from w2s.export_wandb import export_to_wandb

API_KEY = "w2s-test-api-key-0123456789abcdef0123"

pytestmark = pytest.mark.slow


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attempt of this process to reach a host (the wandb-core child talks over a Unix socket)."""
    attempts: list[Any] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX:
            attempts.append(address)
        return real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def test_offline_export_is_what_wandb_sync_uploads(
    tmp_path: Path, no_network: list[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    export = fixture.build_job("job-1")
    directory = tmp_path / "wandb-runs"
    exported = export_to_wandb(
        export, project="w2s-test", entity=None, mode="offline", directory=directory, api_key=API_KEY
    )

    assert no_network == [], "offline export tried to reach the network"
    printed = capfd.readouterr()
    assert printed.out == "" and "wandb" not in printed.err.lower()
    assert not [
        path for path in directory.rglob("*") if path.is_file() and API_KEY.encode() in path.read_bytes()
    ]
    assert exported.url is None and len(exported.run_dirs) == len(export.stages) + 1
    assert all(
        folder.parent == directory / "wandb" and folder.name.startswith("offline-run-")
        for folder in exported.run_dirs
    )

    runs = {read_run(folder).run.run_id: read_run(folder) for folder in exported.run_dirs}
    assert set(runs) == {*exported.stage_runs.values(), exported.run_id}

    # Each stage: a run of the job's group, its kind as job type, named after the job.
    student = runs[exported.stage_runs[fixture.stage_id("student:xent", 0)]]
    assert student.run.project == "w2s-test" and student.run.run_group == export.group
    assert (
        student.run.job_type == "student:xent"
        and student.run.display_name == "probe job · student:xent seed 0"
    )
    assert "student:xent" in student.run.tags and "dataset:sst2" in student.run.tags
    # Config: the flattened spec, nested again (W&B shows weak.model), numbers as numbers; and the stage.
    assert student.config["weak"]["model"] == "gpt2" and student.config["strong"]["lr"] == 0.0002
    assert student.config["losses"] == "xent,logconf(aux_coef=0.5)" and student.config["seeds"] == "0,1"
    assert student.config["stage"]["stage_key"] == fixture.stage_key("student:xent", 0)
    assert student.config["stage"]["train"]["epochs"] == 1.0 and student.config["stage"]["loss"] == "xent"
    # History: one row per step, in order, every curve at its steps.
    steps = [row["_step"] for row in student.history]
    assert steps == list(range(1, fixture.STEPS + 1))
    assert [row["loss"] for row in student.history] == pytest.approx(
        [fixture.loss_value("student:xent", 0, step) for step in steps]
    )
    assert [row["_step"] for row in student.history if "eval_accuracy" in row] == [10, 20, 30, 40, 50]
    assert student.summary["accuracy"] == pytest.approx(0.8) and student.summary["auroc"] == pytest.approx(
        0.83
    )
    assert student.exit_code == 0

    # The reused stage: no curves of its own, said so, with the key that finds the computing run.
    reused = runs[exported.stage_runs[fixture.stage_id(*fixture.REUSED)]]
    assert reused.history == [] and reused.summary["reused"] is True
    assert "reused" in reused.run.tags and fixture.REUSED_KEY in reused.run.notes
    assert reused.config["stage"]["stage_key"] == fixture.REUSED_KEY

    # The results run: the job's figures in its summary, its files with it.
    results = runs[exported.run_id]
    assert results.run.job_type == "results" and results.run.run_group == export.group
    assert results.run.display_name == "probe job · results"
    expected = fixture.job_results()["students"]["logconf(aux_coef=0.5)"]
    assert results.summary["student.logconf_aux_coef_0.5.pgr"] == pytest.approx(expected["pgr"])
    assert results.summary["student.logconf_aux_coef_0.5.pgr_ci_low"] == pytest.approx(expected["pgr_ci"][0])
    assert {"results.json", "manifest.json", "curves_loss.svg", "curves_accuracy.svg"} <= results.files
    saved = json.loads((Path(exported.run_dirs[-1]) / "files" / "results.json").read_text())
    assert saved == json.loads(json.dumps(fixture.job_results()))

    # `wandb sync` takes these folders as they are (--dry-run: lists what it would upload).
    sync = [str(Path(sys.executable).with_name("wandb")), "sync", "--dry-run", *map(str, exported.run_dirs)]
    listed = subprocess.run(sync, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert all(f"run-{run_id}.wandb" in listed.stdout + listed.stderr for run_id in runs)

    # Exported again: the same run ids, so `wandb sync` (and online mode) resume the same runs.
    again = export_to_wandb(
        export, project="w2s-test", entity=None, mode="offline", directory=directory, api_key=None
    )
    assert again.run_id == exported.run_id and again.stage_runs == exported.stage_runs


def test_w2s_run_writes_offline_wandb_runs(
    tiny_bert: Path,
    tiny_gpt2: Path,
    sst2_dir: Path,
    tmp_path: Path,
    no_network: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from w2s.cli import main

    spec = fixture.write_tiny_spec(tmp_path / "tiny.json", tiny_bert, tiny_gpt2)
    offline = tmp_path / "offline"
    argv = ["run", str(spec), "--data-dir", str(sst2_dir), "--store", str(tmp_path / "store")]
    assert main([*argv, "--wandb-project", "w2s-cli", "--wandb-offline", str(offline)]) == 0
    assert no_network == []
    assert "W&B: group 'tiny " in capsys.readouterr().err

    runs = [read_run(folder) for folder in sorted((offline / "wandb").glob("offline-run-*"))]
    by_type = {run.run.job_type: run for run in runs}
    assert sorted(by_type) == ["ceiling", "results", "student:xent", "weak"]
    assert len({run.run.run_group for run in runs}) == 1
    weak = by_type["weak"]
    assert weak.config["weak"]["model"] == str(tiny_bert) and weak.config["stage"]["kind"] == "weak"
    steps = [row["_step"] for row in weak.history]
    assert steps and steps == sorted(steps) and all("loss" in row for row in weak.history)
    assert "accuracy" in weak.summary
    assert (
        "student.xent.accuracy" in by_type["results"].summary and "results.json" in by_type["results"].files
    )


def wandb_core_children() -> list[int]:
    """The wandb-core service processes this process started and that still run."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:  # it ended meanwhile
            continue
        command, fields = rest.rsplit(") ", 1)
        if command == "wandb-core" and int(fields.split()[1]) == os.getpid():
            found.append(int(pid))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_every_run_is_written_out_when_the_export_returns(tmp_path: Path) -> None:
    """wandb-core writes a run's file (its transaction log) out only as it closes the run's stream,
    which happens after ``run.finish()`` has returned: read at once, `w2s run`'s last run once held no
    records under load (``run`` None). The export waits for W&B's service to close every stream and
    exit, so each folder it returns is complete whatever the machine's load."""
    exported = export_to_wandb(
        fixture.build_job(None),
        project="w2s-test",
        entity=None,
        mode="offline",
        directory=tmp_path,
        api_key=None,
    )
    assert wandb_core_children() == [], "W&B's service still runs: the runs' files may not be written yet"
    for folder in exported.run_dirs:
        run = read_run(folder)
        assert run.run is not None and run.exit_code is not None, f"{folder.name}: incomplete"


def test_online_requests_and_a_runs_end_are_bounded() -> None:
    import wandb

    from w2s.export_wandb import request_bounds

    settings = wandb.Settings(mode="online", **request_bounds(30, 2))
    assert settings.x_graphql_timeout_seconds == settings.x_file_stream_timeout_seconds == 30
    assert settings.x_graphql_retry_max == settings.x_file_transfer_retry_max == 2
    assert 0 < settings.init_timeout <= 100 and 0 < settings.finish_timeout <= 180
    assert settings.finish_timeout_raises  # a run's end past its bound fails the try: it is tried again
    assert request_bounds(None, None) == {}
