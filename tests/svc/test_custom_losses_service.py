"""Losses of your own in the service: the API, planning and the stage workers (in-process, in a stage's
own process, and as real Celery workers) all load the same plug-ins, from W2S_LOSS_MODULES or an
installed package's ``w2s.losses`` entry point; an unknown loss is refused at submit with the
choices, and a host without the plug-in fails with the loss named and the fix."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from loss_plugins import EXAMPLE_PACKAGE, as_new_process, fresh_registry, unique, write_loss_module
from sqlalchemy import select

from helpers import registered_losses, write_sst2_like
from service.db import session_scope
from service.models import Stage
from svc_support import Stack, Steps, finished, tiny_job, wait_for
from w2s.losses import LossPluginError
from w2s.spec import LossSpec, parse_spec
from w2s.splits import prepare_seed_data
from w2s.stages import STAGES, StageError, plan_weak
from w2s.store import ArtifactStore
from worker.control import plan_job_task
from worker.isolation import run_isolated


@dataclasses.dataclass
class PlugIn:
    module: str
    loss: str
    source: Path


@pytest.fixture
def plug_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PlugIn:
    """A module registering a loss, named by W2S_LOSS_MODULES and on PYTHONPATH (as a deployment sets
    both on every host), in a registry that has not loaded its plug-ins yet. Request it before
    ``client`` or ``stack``, so that they start with it."""
    module, loss = unique("team_losses"), unique("scaled")
    source = write_loss_module(tmp_path / "plugins", module, loss)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "plugins"), prepend=os.pathsep)  # the workers'
    monkeypatch.setenv("W2S_LOSS_MODULES", module)
    as_new_process(monkeypatch, module)
    return PlugIn(module, loss, source)


def test_the_api_accepts_a_plug_in_loss_and_refuses_an_unknown_one_with_the_choices(
    plug_in: PlugIn, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert, losses=["xent", {"name": plug_in.loss, "offset": 0.5}])
    assert client.post("/v1/jobs", json=body, headers=team.headers).status_code == 201
    refused = client.post(
        "/v1/jobs", json=tiny_job(tiny_bert, tiny_bert, losses=["xent", "mine"]), headers=team.headers
    )
    assert refused.status_code == 422
    fields = {".".join(map(str, item["loc"][1:])): item["msg"] for item in refused.json()["detail"]}
    assert "unknown loss 'mine'; choose one of:" in fields["losses.1"]
    assert plug_in.loss in fields["losses.1"] and "logconf" in fields["losses.1"]
    bad_parameter = tiny_job(tiny_bert, tiny_bert, losses=[{"name": plug_in.loss, "offset": "big"}])
    refused = client.post("/v1/jobs", json=bad_parameter, headers=team.headers)
    assert refused.status_code == 422 and "offset must be a number" in refused.text


def test_the_api_does_not_start_with_a_loss_module_it_cannot_import(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.main import create_app

    monkeypatch.setenv("W2S_LOSS_MODULES", "not_installed_losses")
    fresh_registry(monkeypatch)
    app = create_app()
    with (
        pytest.raises(LossPluginError, match="W2S_LOSS_MODULES names 'not_installed_losses'"),
        TestClient(app),
    ):
        pass


def test_a_job_with_a_plug_in_loss_is_planned_and_run(
    plug_in: PlugIn, client: TestClient, make_team, tiny_bert: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert, losses=["xent", plug_in.loss])
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]
    outcome = Steps().run(job_id)
    assert outcome["status"] == "succeeded", outcome
    assert set(outcome["results"]["students"]) == {"xent", plug_in.loss}


def test_a_worker_without_the_plug_in_fails_its_stage_naming_the_loss_and_the_fix(
    plug_in: PlugIn, client: TestClient, make_team, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert, losses=["xent", plug_in.loss])
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]
    steps = Steps()
    for planned_job, token in steps.round().plan:  # planned where the plug-in is installed ...
        plan_job_task(planned_job, token)
    # ... and run on a host whose workers lack it.
    monkeypatch.delenv("W2S_LOSS_MODULES")
    as_new_process(monkeypatch, plug_in.module)
    outcome = steps.run(job_id)
    assert outcome["status"] == "failed"
    with session_scope() as session:
        stages = {
            s.kind: (s.status, s.error) for s in session.scalars(select(Stage).where(Stage.job_id == job_id))
        }
    status, error = stages[f"student:{plug_in.loss}"]
    assert status == "failed"
    assert f"loss '{plug_in.loss}' is not installed on this worker's host" in error
    assert "W2S_LOSS_MODULES" in error and "w2s.losses" in error and "retry the job" in error
    assert stages["weak"][0] == "succeeded"  # what needs no plug-in ran


def test_a_control_worker_without_the_plug_in_fails_the_job_naming_the_loss_and_the_fix(
    plug_in: PlugIn, client: TestClient, make_team, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert, losses=["xent", {"name": plug_in.loss, "offset": 0.5}])
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]
    monkeypatch.delenv("W2S_LOSS_MODULES")  # accepted by the API; planned where the plug-in is missing
    as_new_process(monkeypatch, plug_in.module)
    outcome = Steps().run(job_id)
    assert outcome["status"] == "failed"
    assert outcome["error"].startswith(
        f"cannot plan the job: losses[1]: loss '{plug_in.loss}' is not installed on this worker's host"
    )
    assert "W2S_LOSS_MODULES" in outcome["error"] and "validation error" not in outcome["error"]


# -- a full or LoRA stage runs in a process of its own ---------------------------------------------


def weak_plan_with(loss: str, model: Path, data_dir: Path):  # type: ignore[no-untyped-def]
    """A small full fine-tuning stage trained with ``loss``."""
    options = {"mode": "full", "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec = parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 64, "n_test": 32, "seed": 0},
            "weak": {"model": str(model), **options},
            "strong": {"model": str(model), **options},
        }
    )
    plan = plan_weak(spec, 0, prepare_seed_data(spec, 0, data_dir), device_kind="cpu")
    return dataclasses.replace(plan, loss=LossSpec(name=loss))


def test_a_stage_in_its_own_process_loads_the_plug_in_and_refuses_one_edited_since(
    plug_in: PlugIn, tiny_bert: Path, tmp_path: Path
) -> None:
    plan = weak_plan_with(plug_in.loss, tiny_bert, write_sst2_like(tmp_path / "data"))
    store = ArtifactStore(str(tmp_path / "store"))
    result = run_isolated(plan, store.uri, lambda _: True)
    assert result.key == plan.key and store.get_record(STAGES, plan.key) is not None
    # Edited on disk after this worker imported it: the child would run other code than the key says.
    plug_in.source.write_text(plug_in.source.read_text().replace("* 1.0", "* 5.0"))
    again = dataclasses.replace(plan, seed=1)
    with pytest.raises(StageError, match=rf"loss '{plug_in.loss}': its source \({plug_in.module}\) changed"):
        run_isolated(again, str(tmp_path / "other"), lambda _: True)


@dataclasses.dataclass(frozen=True)
class Doubled:
    """Twice the cross entropy, registered by hand (as a script or a test might)."""

    def __call__(self, logits, labels, step_frac):  # type: ignore[no-untyped-def]
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels.float()) * 2


def test_a_stage_in_its_own_process_finds_a_loss_registered_by_hand_or_says_why_not(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh_registry(monkeypatch)
    data_dir = write_sst2_like(tmp_path / "data")
    with registered_losses(test_doubled=Doubled):  # importable: this module, by name
        plan = weak_plan_with("test_doubled", tiny_bert, data_dir)
        assert run_isolated(plan, str(tmp_path / "a"), lambda _: True).steps > 0

    @dataclasses.dataclass(frozen=True)
    class Local(Doubled):
        """Defined in a function: no process but this one can import it."""

    with registered_losses(test_local=Local):
        plan = weak_plan_with("test_local", tiny_bert, data_dir)
        with pytest.raises(StageError, match=r"'test_local': its class .*Local cannot be imported"):
            run_isolated(plan, str(tmp_path / "b"), lambda _: True)


# -- real workers ------------------------------------------------------------------------------------


PIP_INSTALL = [
    sys.executable,
    "-m",
    "pip",
    "install",
    "--quiet",
    "--no-deps",
    "--no-build-isolation",
    "--no-index",
]


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """examples/custom_loss installed with pip into a folder of its own (its entry point with it),
    offline; on this process's path and the workers' PYTHONPATH."""
    target = tmp_path / "site"
    source = shutil.copytree(EXAMPLE_PACKAGE, tmp_path / "custom_loss")  # setuptools builds in the tree
    subprocess.run([*PIP_INSTALL, "--target", str(target), str(source)], check=True, capture_output=True)
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.setenv("PYTHONPATH", str(target), prepend=os.pathsep)
    return target


@pytest.mark.slow
def test_real_workers_run_plug_in_losses_from_a_package_and_from_w2s_loss_modules(
    installed_example: Path,
    plug_in: PlugIn,
    monkeypatch: pytest.MonkeyPatch,
    stack: Stack,
    client: TestClient,
    make_team,
    tiny_bert: Path,
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    losses = [{"name": "balanced_xent", "strength": 0.5}, plug_in.loss]
    body = tiny_job(tiny_bert, tiny_bert, losses=losses)  # full fine-tuning: each stage in its own process
    job_id = client.post("/v1/jobs", json=body, headers=team.headers).json()["id"]
    job = wait_for(lambda: finished(client, team.headers, job_id), 240, stack, "the job to finish")
    assert job["status"] == "succeeded", stack.logs()
    assert set(job["results"]["students"]) == {"balanced_xent(strength=0.5)", plug_in.loss}
