"""The ``w2s`` command line: run, datasets, losses, models prepare-offline; readable errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from w2s.cli import data_lines, main, results_table
from w2s.results import SeedPredictions, build_results
from w2s.settings import library_settings


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
    tiny_bert: Path,
    tiny_gpt2: Path,
    sst2_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A resume checkpoint after every step: the progress bars show them, and nothing else changes.
    monkeypatch.setenv("W2S_CHECKPOINT_EVERY_STEPS", "1")
    library_settings.cache_clear()
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
    assert not list((tmp_path / "store").rglob("*.pt"))  # every stage's checkpoint went with its result
    library_settings.cache_clear()


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


def test_results_table_rows_align() -> None:
    # logconf collapsed to one answer: every seed scores the same, so its spread is exactly 0.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)

    def probs(accuracy: float) -> np.ndarray:
        hard = np.where(rng.random(len(labels)) < accuracy, labels, 1 - labels)
        return np.clip(0.5 + (hard - 0.5) * rng.uniform(0.1, 0.9, len(labels)), 0.0, 1.0)

    predictions = [
        SeedPredictions(
            seed,
            probs(0.7),
            probs(0.9),
            {"xent": probs(0.8), "logconf": np.full(len(labels), 0.6), "product": probs(0.8)},
        )
        for seed in (0, 1, 2)
    ]
    results = json.loads(json.dumps(build_results(predictions, labels, {"total": 1.0})))
    assert results["students"]["logconf"]["accuracy_std"] == 0.0
    console = Console(width=120, record=True)
    console.print(results_table(results))
    lines = console.export_text().splitlines()
    value_lines = [line for line in lines if "±" in line]
    assert len(value_lines) == 5  # weak, ceiling, three students
    # Every row's borders and decimal points fall in the same columns: the lines with a figure in
    # every column (the students') all put theirs at the same places, the others a subset of them.
    borders = {tuple(m.start() for m in re.finditer("│", line)) for line in lines if line.startswith("│")}
    assert len(borders) == 1
    students = [line for line in value_lines if "student" in line]
    plus_minus = {tuple(m.start() for m in re.finditer("±", line)) for line in students}
    assert len(plus_minus) == 1 and len(next(iter(plus_minus))) == 4
    for line in value_lines:
        assert {m.start() for m in re.finditer("±", line)} <= set(next(iter(plus_minus)))


def test_data_lines_say_which_counts_are_means_over_seeds() -> None:
    def counts(rows: int, truncated: int = 0) -> dict[str, int]:
        return {"rows": rows, "dropped_too_long": 0, "truncated": truncated, "overlap_removed": 0}

    per_seed = [
        {"seed": seed, "train_b": counts(rows), "test": counts(500, 2)}
        for seed, rows in enumerate((930, 933, 934))
    ]
    data = {
        "sampling": "random",
        "resample_per_seed": True,
        "remove_overlap": True,
        "splits": {"train_b": counts(0) | {"rows": 932.3333333333334}, "test": counts(500, 2)},
        "per_seed": per_seed,
    }
    lines = data_lines(data)
    assert "  train_b: 932.333 rows (mean of 3 seeds; rows 930 to 934)" in lines
    assert "  test: 500 rows, 2 truncated" in lines  # the same for every seed: no mean to speak of
