"""The ``w2s`` command line: run, datasets, losses, models prepare-offline; readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2s.cli import main


def write_spec(path: Path, weak: Path, strong: Path, **dataset: object) -> Path:
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec = {
        "dataset": {"name": "sst2", "n_train": 80, "n_test": 30, **dataset},
        "weak": {"model": str(weak), **options},
        "strong": {"model": str(strong), "mode": "probe"},
        "losses": ["xent", {"name": "logconf", "aux_coef": 0.25}],
    }
    path.write_text(json.dumps(spec))
    return path


def test_run_writes_results_and_manifest(
    tiny_bert: Path, tiny_gpt2: Path, sst2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.json", tiny_bert, tiny_gpt2)
    out = tmp_path / "out" / "results.json"
    argv = [
        "run",
        str(spec),
        "--data-dir",
        str(sst2_dir),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["students"]) == {"xent", "logconf(aux_coef=0.25)"}
    manifest = json.loads((tmp_path / "out" / "results.manifest.json").read_text())
    assert {stage["kind"] for stage in manifest["stages"]} >= {"weak", "ceiling"}
    assert "student: xent" in capsys.readouterr().out  # the results table


def test_bad_spec_is_one_readable_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"dataset": {"name": "sst2"}, "weak": {"model": "gpt2", "mode": "x"}}))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "weak.mode" in err and "strong" in err and "Traceback" not in err


def test_missing_offline_split_names_the_path(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    spec = write_spec(tmp_path / "spec.json", tiny_bert, tiny_bert)
    assert main(["run", str(spec), "--data-dir", str(tmp_path / "data"), "--store", str(tmp_path / "s")]) == 2
    assert "train" in capsys.readouterr().err


def test_losses_and_datasets_listings(sst2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("xent", "logconf", "product", "window", "entropy", "kl"))
    assert main(["datasets", "--data-dir", str(sst2_dir)]) == 0
    out = capsys.readouterr().out
    assert "sciq" in out and "sst2" in out


def test_prepare_offline_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "prepare-offline", str(tmp_path), "gpt-5", "--no-install"]) == 2
    assert "all-MiniLM-L6-v2" in capsys.readouterr().err
