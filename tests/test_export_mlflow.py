"""Exports to a real MLflow tracking server (``mlflow server``, SQLite store, proxied artifacts), read
back through MlflowClient as a researcher browsing the experiment would: the run tree, params, tags,
curves by step, the results' figures, the files; a second export of the same job adds no copies, and
a reused stage links to the run that computed it instead of repeating its curves."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import export_support as fixture
from w2s.export_mlflow import export_to_mlflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fixture.mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def runs_of(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Any]:
    return list(client.search_runs([experiment_id], filter_string=filter_string, max_results=1000))


def test_a_job_as_a_run_tree_with_curves_params_and_files(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri)
    # An earlier job computed the stage that this one reuses (seed 1's weak model).
    earlier = export_to_mlflow(fixture.build_job("job-earlier", reused_stage=False), tracking_uri, "w2s-tree")
    computing_run = earlier.stage_runs[fixture.stage_id(*fixture.REUSED)]

    export = fixture.build_job("job-1")
    exported = export_to_mlflow(export, tracking_uri, "w2s-tree")
    experiment = client.get_experiment_by_name("w2s-tree")
    assert exported.experiment_id == experiment.experiment_id and not exported.updated_existing
    assert exported.url == f"{tracking_uri}/#/experiments/{experiment.experiment_id}/runs/{exported.run_id}"

    # The parent: the job, with the spec as params and the results as metrics.
    parent = client.get_run(exported.run_id)
    assert parent.info.run_name == "probe job" and parent.info.status == "FINISHED"
    assert parent.data.tags["w2s.job_id"] == "job-1" and parent.data.tags["w2s.dataset"] == "sst2"
    assert parent.data.tags["w2s.weak"] == "gpt2" and parent.data.tags["w2s.w2s_version"]
    assert parent.data.params == export.params
    assert parent.data.params["strong.lr"] == "0.0002" and parent.data.params["seeds"] == "0,1"
    assert parent.data.metrics == pytest.approx(export.metrics)
    results = fixture.job_results()
    assert parent.data.metrics["student.xent.pgr"] == pytest.approx(results["students"]["xent"]["pgr"])

    # Its files: listed, and the results document downloads intact.
    listed = {item.path for item in client.list_artifacts(exported.run_id)}
    assert {"results.json", "manifest.json", "curves_loss.svg", "curves_accuracy.svg"} <= listed
    downloaded = client.download_artifacts(exported.run_id, "results.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text()) == json.loads(json.dumps(results))

    # The tree: a nested run per stage, named and tagged by kind and seed.
    children = runs_of(client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{exported.run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(
        f"{kind} seed {seed}" for seed in fixture.SEEDS for kind in fixture.KINDS
    )
    assert {run.info.run_id for run in children} == set(exported.stage_runs.values())
    student = client.get_run(exported.stage_runs[fixture.stage_id("student:xent", 0)])
    assert student.data.tags["w2s.kind"] == "student:xent" and student.data.tags["w2s.seed"] == "0"
    assert student.data.tags["w2s.stage_key"] == fixture.stage_key("student:xent", 0)
    assert student.data.params["stage_key"] == fixture.stage_key("student:xent", 0)
    assert student.data.params["loss"] == "xent" and student.data.params["train.lr"] == "0.0002"
    assert student.data.metrics["accuracy"] == pytest.approx(0.8)
    assert student.info.status == "FINISHED" and student.info.end_time > student.info.start_time

    # Its curves, by step, in order: what MLflow's charts draw.
    history = client.get_metric_history(student.info.run_id, "loss")
    assert [point.step for point in history] == list(range(1, fixture.STEPS + 1))
    assert [point.value for point in history] == pytest.approx(
        [fixture.loss_value("student:xent", 0, step) for step in range(1, fixture.STEPS + 1)]
    )
    evaluations = client.get_metric_history(student.info.run_id, "eval_accuracy")
    assert [point.step for point in evaluations] == [10, 20, 30, 40, 50]

    # The reused stage: linked to the run that computed it, its curves not logged again.
    reused = client.get_run(exported.stage_runs[fixture.stage_id(*fixture.REUSED)])
    assert reused.data.tags["w2s.reused"] == "true"
    assert reused.data.tags["w2s.reused_from_run"] == computing_run
    assert computing_run in reused.data.tags["mlflow.note.content"]
    assert client.get_metric_history(reused.info.run_id, "loss") == []
    assert len(client.get_metric_history(computing_run, "loss")) == fixture.STEPS
    assert reused.data.metrics["accuracy"] == pytest.approx(0.71)


def test_exporting_again_updates_the_same_runs(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    export = fixture.build_job("job-again")
    first = export_to_mlflow(export, tracking_uri, "w2s-again")
    experiment_id = first.experiment_id
    assert experiment_id is not None
    count = len(runs_of(client, experiment_id))
    assert count == 1 + len(export.stages)

    second = export_to_mlflow(export, tracking_uri, "w2s-again")
    third = export_to_mlflow(export, tracking_uri, "w2s-again", existing_run_id=first.run_id)
    assert second.updated_existing and third.updated_existing
    assert first.run_id == second.run_id == third.run_id and first.stage_runs == third.stage_runs
    assert len(runs_of(client, experiment_id)) == count
    student = first.stage_runs[fixture.stage_id("student:xent", 1)]
    assert len(client.get_metric_history(student, "loss")) == fixture.STEPS  # not 3 x 50
    assert len(client.get_metric_history(first.run_id, "student.xent.pgr")) == 1

    # A stage run an interrupted export left half written is made anew, not appended to.
    half_written = first.stage_runs[fixture.stage_id("ceiling", 0)]
    client.delete_tag(half_written, "w2s.export_complete")
    fourth = export_to_mlflow(export, tracking_uri, "w2s-again")
    remade = fourth.stage_runs[fixture.stage_id("ceiling", 0)]
    assert fourth.run_id == first.run_id and remade != half_written
    assert client.get_run(half_written).info.lifecycle_stage == "deleted"
    assert len(client.get_metric_history(remade, "loss")) == fixture.STEPS
    assert len(runs_of(client, experiment_id)) == count

    # A library run (no job id) is a new run every time.
    anonymous = fixture.build_job(None)
    assert export_to_mlflow(anonymous, tracking_uri, "w2s-again").run_id != first.run_id
    assert len(runs_of(client, experiment_id)) == 2 * count


def test_w2s_run_exports_to_mlflow(
    tracking_uri: str,
    tiny_bert: Path,
    tiny_gpt2: Path,
    sst2_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from w2s.cli import main

    spec = fixture.write_tiny_spec(tmp_path / "tiny.json", tiny_bert, tiny_gpt2)
    argv = ["run", str(spec), "--data-dir", str(sst2_dir), "--store", str(tmp_path / "store")]
    assert main([*argv, "--mlflow", tracking_uri, "--mlflow-experiment", "w2s-cli"]) == 0
    captured = capsys.readouterr()
    assert "View run" not in captured.out  # MLflow's client prints nothing into the results
    assert "MLflow: run" in captured.err and tracking_uri in captured.err

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("w2s-cli")
    parents = runs_of(client, experiment.experiment_id, "tags.`w2s.role` = 'job'")
    assert len(parents) == 1 and parents[0].info.run_name.startswith("tiny ")
    parent = parents[0]
    assert parent.data.params["weak.model"] == str(tiny_bert) and parent.data.params["losses"] == "xent"
    assert "student.xent.accuracy" in parent.data.metrics and "weak.accuracy" in parent.data.metrics
    assert "results.json" in {item.path for item in client.list_artifacts(parent.info.run_id)}
    children = runs_of(
        client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(run.info.run_name for run in children) == [
        "ceiling seed 0",
        "student:xent seed 0",
        "weak seed 0",
    ]
    for child in children:  # each stage's curve, step by step, as the progress callback saw it
        history = client.get_metric_history(child.info.run_id, "loss")
        steps = [point.step for point in history]
        assert steps and steps == sorted(steps) and steps[0] == 1
        assert child.data.metrics["accuracy"] >= 0.0 and child.data.tags["w2s.stage_key"]

    # Run again: every stage comes from the store now, and each links to its first run.
    assert main([*argv, "--mlflow", tracking_uri, "--mlflow-experiment", "w2s-cli"]) == 0
    parents = runs_of(client, experiment.experiment_id, "tags.`w2s.role` = 'job'")
    assert len(parents) == 2
    latest = max(parents, key=lambda run: run.info.start_time)
    relinked = runs_of(
        client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{latest.info.run_id}'"
    )
    computed = {run.info.run_id for run in children}
    assert all(run.data.tags["w2s.reused"] == "true" for run in relinked)
    assert {run.data.tags["w2s.reused_from_run"] for run in relinked} == computed
    assert all(client.get_metric_history(run.info.run_id, "loss") == [] for run in relinked)


def test_w2s_run_refuses_an_unreachable_server_before_training(
    tiny_bert: Path, tiny_gpt2: Path, sst2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from w2s.cli import main

    spec = fixture.write_tiny_spec(tmp_path / "tiny.json", tiny_bert, tiny_gpt2)
    nowhere = f"http://127.0.0.1:{fixture.free_port()}"
    argv = ["run", str(spec), "--data-dir", str(sst2_dir), "--store", str(tmp_path / "store")]
    started = time.monotonic()
    assert main([*argv, "--mlflow", nowhere]) == 2
    assert time.monotonic() - started < 30  # one try, not MLflow's minutes of retries
    assert f"MLflow at {nowhere} cannot be used" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing trained


def test_a_server_that_never_answers_fails_the_export_after_one_bounded_request() -> None:
    from mlflow.exceptions import MlflowException

    with fixture.silent_server() as server:
        with pytest.raises(MlflowException, match="timed out"):
            export_to_mlflow(
                fixture.build_job("job-silent"),
                server.uri,
                "w2s-silent",
                request_timeout_s=1,
                request_retries=0,
            )
        assert server.accepted == 1  # one request, no retries of MLflow's own (7 by default)
        deadline = time.monotonic() + 5
        while server.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.open == 0  # the client gave up on it
