"""Resume checkpoints (w2s/resume.py): a stage stopped part-way and run again goes on from its last
checkpoint and ends exactly as an uninterrupted run, on the CPU in float32: the same weights bit
for bit, the same predictions and metrics."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_pipeline import tiny_spec

from w2s import train
from w2s.resume import RESUME, YIELD, CheckpointPolicy, CheckpointSaved, Resumed, Yielded
from w2s.spec import parse_spec
from w2s.splits import prepare_seed_data
from w2s.stages import StageCancelled, StageResult, plan_seed, run_stage
from w2s.store import ArtifactStore

NEVER = CheckpointPolicy(every_steps=0, every_s=0)


def student_plan(tiny_bert: Path, sst2_dir: Path, store: ArtifactStore, mode: str, **options: Any) -> Any:
    """The logconf student's plan (weak labels, whole-batch statistics under accumulation), its weak
    stage already run into ``store``."""
    spec_dict = tiny_spec(tiny_bert, tiny_bert, mode=mode, losses=["logconf"])
    spec_dict["strong"] |= {
        "epochs": 3,
        "batch_size": 8,
        "minibatch_size": 4,
        "save_checkpoint": True,
    } | options
    spec = parse_spec(spec_dict)
    weak, _, student = plan_seed(spec, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu")
    run_stage(weak, store, checkpoint_policy=NEVER)
    return student


def weights(store: ArtifactStore, result: StageResult) -> dict[str, torch.Tensor]:
    assert result.checkpoint is not None
    return torch.load(io.BytesIO(store.get_checkpoint(result.checkpoint)), weights_only=True)


def assert_identical(store_a: ArtifactStore, a: StageResult, store_b: ArtifactStore, b: StageResult) -> None:
    assert (a.accuracy, a.auroc, a.steps, a.best_step, a.holdout_loss) == (
        b.accuracy,
        b.auroc,
        b.steps,
        b.best_step,
        b.holdout_loss,
    )
    assert np.array_equal(store_a.get_array(a.test_probs), store_b.get_array(b.test_probs))
    weights_a, weights_b = weights(store_a, a), weights(store_b, b)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("full", {"train_dropout": True}),  # dropout draws from torch's generator every step
        ("lora", {"holdout_frac": 0.25, "early_stopping_patience": 5}),  # best weights kept so far
    ],
)
def test_a_stage_that_yields_resumes_and_ends_identical_to_an_uninterrupted_run(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path, mode: str, options: dict[str, Any]
) -> None:
    whole_store = ArtifactStore(str(tmp_path / "whole"))
    plan = student_plan(tiny_bert, sst2_dir, whole_store, mode, **options)
    whole = run_stage(plan, whole_store, checkpoint_policy=NEVER)

    store = ArtifactStore(str(tmp_path / "interrupted"))
    plan = student_plan(tiny_bert, sst2_dir, store, mode, **options)
    yield_at = whole.steps // 2
    seen: list[Any] = []

    def preempted(progress: Any) -> Any:
        seen.append(progress)
        return YIELD if getattr(progress, "step", 0) == yield_at and progress.phase == "train" else None

    with pytest.raises(Yielded) as yielded:
        run_stage(plan, store, callback=preempted, checkpoint_policy=NEVER)
    assert yielded.value.step == yield_at
    assert next(p for p in seen if isinstance(p, CheckpointSaved)).step == yield_at
    assert store.get_named_file(RESUME, f"{plan.key}.pt", str(tmp_path / "copy.pt"))

    events: list[Any] = []
    resumed = run_stage(plan, store, callback=lambda p: events.append(p) is None, checkpoint_policy=NEVER)
    assert events[0] == Resumed(yield_at, whole.steps)
    trained = [p.step for p in events if isinstance(p, train.Progress)]
    assert trained == list(range(yield_at + 1, whole.steps + 1))  # nothing trained twice
    assert_identical(whole_store, whole, store, resumed)
    # The result is stored: the checkpoint is gone.
    assert not store.get_named_file(RESUME, f"{plan.key}.pt", str(tmp_path / "again.pt"))


def test_periodic_checkpoints_survive_a_stop_and_a_new_run_goes_on_from_the_last(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    whole_store = ArtifactStore(str(tmp_path / "whole"))
    plan = student_plan(tiny_bert, sst2_dir, whole_store, "full")
    whole = run_stage(plan, whole_store, checkpoint_policy=NEVER)

    store = ArtifactStore(str(tmp_path / "stopped"))
    plan = student_plan(tiny_bert, sst2_dir, store, "full")
    every_3 = CheckpointPolicy(every_steps=3, every_s=0)
    saved: list[int] = []

    def stop_at_8(progress: Any) -> bool:
        if isinstance(progress, CheckpointSaved):
            saved.append(progress.step)
        return not (isinstance(progress, train.Progress) and progress.step == 8)

    with pytest.raises(StageCancelled):  # a cancel (or a lost worker) keeps the last checkpoint
        run_stage(plan, store, callback=stop_at_8, checkpoint_policy=every_3)
    assert saved == [3, 6]
    events: list[Any] = []
    resumed = run_stage(plan, store, callback=lambda p: events.append(p) is None, checkpoint_policy=every_3)
    assert events[0] == Resumed(6, whole.steps)
    assert_identical(whole_store, whole, store, resumed)


def test_a_checkpoint_of_another_run_is_ignored(tiny_bert: Path, sst2_dir: Path, tmp_path: Path) -> None:
    """A checkpoint whose steps or trainable weights are not this run's (a file from an older code
    version that kept the same key, say) is not applied: the stage starts over, never half-mixed."""
    store = ArtifactStore(str(tmp_path / "store"))
    plan = student_plan(tiny_bert, sst2_dir, store, "full")
    with pytest.raises(Yielded):
        run_stage(plan, store, callback=lambda p: YIELD, checkpoint_policy=NEVER)
    other = student_plan(tiny_bert, sst2_dir, store, "lora")  # another key: name its file as this one's
    local = tmp_path / "ckpt.pt"
    assert store.get_named_file(RESUME, f"{plan.key}.pt", str(local))
    store.put_named_file(RESUME, f"{other.key}.pt", str(local))
    events: list[Any] = []
    run_stage(other, store, callback=lambda p: events.append(p) is None, checkpoint_policy=NEVER)
    assert not any(isinstance(p, Resumed) for p in events)
    assert next(p.step for p in events if isinstance(p, train.Progress)) == 1
