"""w2s.tracking: what a job's export holds, before any tracker sees it (no MLflow, no W&B here)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import pytest

import export_support as fixture
from w2s.tracking import MAX_PARAM_CHARS, CurveRecorder, build_export

# MLflow's rule for metric and param names on every platform (Windows refuses the colon too).
VALID_NAME = re.compile(r"[/\w.\- ]+")


def build(**changes: Any) -> Any:
    arguments: dict[str, Any] = {
        "spec": fixture.job_spec(),
        "results": fixture.job_results(),
        "stages": fixture.job_stages(),
        "series": fixture.job_series(),
        "figures": fixture.job_figures(),
    }
    arguments.update(changes)
    return build_export(**arguments, name="probe job", group=None, job_id="job-1")


def test_job_params_tags_and_metrics_a_researcher_filters_by() -> None:
    results = fixture.job_results()
    export = build(results=results)

    params = export.params
    assert params["weak.model"] == "gpt2" and params["strong.model"] == "gpt2-medium"
    assert params["dataset.name"] == "sst2" and params["dataset.n_train"] == "120"
    assert params["losses"] == "xent,logconf(aux_coef=0.5)" and params["seeds"] == "0,1"
    assert params["preset"] == "none"
    # Defaults the spec left out are resolved: lora's learning rate, the batch size.
    assert (
        params["weak.lr"] == "0.001" and params["strong.mode"] == "lora" and params["strong.lr"] == "0.0002"
    )
    assert params["strong.batch_size"] == "32" and params["transfer.epochs"] == "1.0"
    assert params["dataset.sampling"] == "random"  # as the run drew it (the results' data block)
    assert all(VALID_NAME.fullmatch(name) for name in params)
    assert all(isinstance(value, str) and len(value) <= MAX_PARAM_CHARS for value in params.values())
    # Leaves only, so W&B can nest them again: no name is another's prefix.
    assert not [a for a in params for b in params if b.startswith(a + ".")]

    assert export.tags["job_id"] == "job-1" and export.tags["dataset"] == "sst2"
    assert export.tags["weak"] == "gpt2" and export.tags["strong"] == "gpt2-medium"
    assert export.tags["losses"] == "xent,logconf(aux_coef=0.5)" and export.tags["w2s_version"]
    assert export.group == "probe job job-1"

    metrics = export.metrics
    xent = results["students"]["xent"]
    assert metrics["student.xent.pgr"] == xent["pgr"]
    assert metrics["student.xent.pgr_std"] == xent["pgr_std"]
    assert [metrics["student.xent.pgr_ci_low"], metrics["student.xent.pgr_ci_high"]] == xent["pgr_ci"]
    assert (
        metrics["student.logconf_aux_coef_0.5.accuracy"]
        == results["students"]["logconf(aux_coef=0.5)"]["accuracy"]
    )
    assert metrics["weak.accuracy"] == results["weak"]["accuracy"]
    assert metrics["ceiling.auroc_ci_high"] == results["ceiling"]["auroc_ci"][1]
    assert metrics["gap.ceiling_minus_weak"] == results["gap"]["ceiling_minus_weak"]
    assert metrics["timings.total"] == 9.0
    assert all(VALID_NAME.fullmatch(name) and ":" not in name for name in metrics)


def test_undefined_figures_are_left_out_not_zero() -> None:
    results = fixture.job_results()
    results["students"]["xent"].update(pgr=None, pgr_ci=None, pgr_std=None)
    metrics = build(results=results).metrics
    assert not [name for name in metrics if name.startswith("student.xent.pgr") and "undefined" not in name]
    assert "student.xent.accuracy" in metrics


def test_files_stages_and_curves() -> None:
    results = fixture.job_results()
    export = build(results=results)
    assert json.loads(export.artifacts["results.json"]) == json.loads(json.dumps(results))
    assert {"manifest.json", "curves_loss.svg", "curves_accuracy.svg"} <= set(export.artifacts)

    stages = {stage.stage_id: stage for stage in export.stages}
    assert len(stages) == len(fixture.SEEDS) * len(fixture.KINDS)
    student = stages[fixture.stage_id("student:xent", 0)]
    assert student.name == "student:xent seed 0" and student.kind == "student:xent" and not student.reused
    assert student.params["stage_key"] == fixture.stage_key("student:xent", 0)
    assert student.params["loss"] == "xent" and student.params["train.epochs"] == "1.0"  # transfer applies
    assert student.tags["status"] == "succeeded" and student.tags["seed"] == "0"
    assert student.metrics == pytest.approx({"accuracy": 0.8, "auroc": 0.83})
    assert sorted(student.curves) == ["eval_accuracy", "loss", "lr", "train_accuracy"]
    assert [step for step, _ in student.curves["loss"]] == list(range(1, fixture.STEPS + 1))
    assert student.curves["loss"][9] == (10, fixture.loss_value("student:xent", 0, 10))
    assert [step for step, _ in student.curves["eval_accuracy"]] == [10, 20, 30, 40, 50]
    assert student.started_at is not None and student.finished_at is not None

    reused = stages[fixture.stage_id(*fixture.REUSED)]
    assert reused.reused and reused.status == "cached" and reused.key == fixture.REUSED_KEY
    assert reused.curves == {}  # the computing run's curves: linked, never copied
    assert reused.tags["reused"] == "true" and reused.metrics["accuracy"] == 0.71


def test_long_values_are_cut_and_the_manifest_gives_resolved_training() -> None:
    spec = fixture.job_spec()
    spec["dataset"]["name"] = {"path": "/data/" + "x" * 900 + ".jsonl", "text": "text", "label": "label"}
    manifest = {"training": {"weak": {"lr": 0.123, "epochs": 3.0}, "ceiling": {"lr": 4e-5}}}
    figures = {**fixture.job_figures(), "manifest.json": json.dumps(manifest).encode()}
    export = build(spec=spec, figures=figures)
    path = export.params["dataset.name.path"]
    assert len(path) == MAX_PARAM_CHARS and path.endswith("…")
    assert export.tags["dataset"].endswith(".jsonl") and "/data/" not in export.tags["dataset"]
    assert export.params["weak.lr"] == "0.123" and export.params["strong.lr"] == "4e-05"


def test_a_figure_name_cannot_leave_the_run_folder() -> None:
    export = build(figures={"../../etc/passwd": b"x", "sub/curves.svg": b"y"})
    assert {"passwd", "curves.svg"} <= set(export.artifacts)


def test_curve_recorder_collects_what_the_service_would_serve() -> None:
    forwarded: list[str] = []
    bars = SimpleNamespace(
        stage_started=lambda plan: forwarded.append("started"),
        stage_progress=lambda plan, progress: forwarded.append("progress"),
        stage_finished=lambda plan, result: forwarded.append("finished"),
    )
    recorder = CurveRecorder(forward=bars)
    for kind, cached in (("weak", False), ("ceiling", True)):
        plan = SimpleNamespace(kind=kind, seed=0)
        recorder.stage_started(plan)
        recorder.stage_progress(plan, SimpleNamespace(phase="features", split="train", done=1, total=2))
        for step in range(1, 11) if not cached else ():
            progress = SimpleNamespace(
                phase="train",
                step=step,
                total_steps=10,
                loss=1.0 / step,
                train_accuracy=0.5,
                lr=1e-3,
                eval_accuracy=0.7 if step % 5 == 0 else None,
            )
            recorder.stage_progress(plan, progress)
        result = SimpleNamespace(
            cached=cached,
            key=f"key-{kind}",
            accuracy=0.8,
            auroc=0.9,
            seconds=1.0,
            train_seconds=0.5,
            steps=10,
            best_step=None,
            holdout_loss=None,
        )
        recorder.stage_finished(plan, result)
    assert forwarded.count("finished") == 2 and "progress" in forwarded

    stages = recorder.stages()
    assert [(s["id"], s["status"], s["reused"], s["key"]) for s in stages] == [
        ("weak seed 0", "succeeded", False, "key-weak"),
        ("ceiling seed 0", "cached", True, "key-ceiling"),
    ]
    series = {entry["name"]: entry for entry in recorder.series()}
    assert series["loss"]["steps"] == list(range(1, 11)) and series["loss"]["values"][1] == 0.5
    assert series["eval_accuracy"]["steps"] == [5, 10]
    export = build_export(
        fixture.job_spec(),
        fixture.job_results(),
        stages,
        recorder.series(),
        {},
        name="n",
        group=None,
        job_id=None,
    )
    weak, ceiling = export.stages
    assert (
        len(weak.curves["loss"]) == 10 and weak.metrics["seconds"] == 1.0 and "best_step" not in weak.metrics
    )
    assert ceiling.reused and ceiling.curves == {}
    assert export.group == "n" and "job_id" not in export.tags
