"""Probe regularisation: weight decay, and early stopping on a held-out slice of the training rows
with the labels the stage trains on. Off by default, as in the reference; when off, nothing about a
stage changes (not even its key)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from w2s.losses import build_loss
from w2s.pipeline import run_experiment
from w2s.spec import SpecError, TrainConfig, TrainingOptions, parse_spec, resolve_training, resolved_models
from w2s.stages import STAGES
from w2s.store import ArtifactStore
from w2s.train import FeatureData, Holdout, Rows, fit, holdout_loss, holdout_split, one_hot

CPU = torch.device("cpu")


def probe_config(**changes: Any) -> TrainConfig:
    base = resolve_training(TrainingOptions(mode="probe"))
    return dataclasses.replace(base, warmup_frac=0.0, lr_schedule="constant", **changes)


def spec_dict(model: Path, **strong: Any) -> dict[str, Any]:
    options = {"mode": "probe", "epochs": 20, "lr": 1e-2, "batch_size": 16, "max_length": 32}
    return {
        "dataset": {"name": "sst2", "n_train": 96, "n_test": 40, "seed": 0},
        "weak": {"model": str(model), **options},
        "strong": {"model": str(model), **options, **strong},
        "losses": ["xent"],
        "seeds": [0],
    }


class Linear(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.head = torch.nn.Linear(width, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def noisy_problem(n: int = 200, width: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Few rows, many features, labels mostly noise: a linear head overfits after a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, width, generator=generator)
    signal = features[:, 0] + 0.5 * torch.randn(n, generator=generator)
    return features, one_hot((signal > 0).long().tolist())


# ------------------------------------------------------------------------------------------------------
# The hold-out


def test_holdout_split_is_seeded_disjoint_and_complete() -> None:
    train, held = holdout_split(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert holdout_split(100, 0.1, seed=3) == (train, held)
    assert holdout_split(100, 0.1, seed=4)[1] != held
    assert holdout_split(100, 0.0, seed=3) == (list(range(100)), [])
    assert len(holdout_split(3, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least a row


def test_rows_view_collates_the_parent_rows() -> None:
    data = FeatureData(torch.arange(10, dtype=torch.float32)[:, None])
    view = Rows(data, [7, 2, 5])
    assert view.lengths == [1, 1, 1]
    assert view.collate([0, 2], CPU)["features"].flatten().tolist() == [7.0, 5.0]


# ------------------------------------------------------------------------------------------------------
# The spec


def test_patience_without_a_holdout_is_refused_naming_both_fields(tiny_bert: Path) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_dict(tiny_bert, holdout_frac=0, early_stopping_patience=2))
    ((loc, message),) = caught.value.errors
    assert loc == "strong" and "early_stopping_patience" in message and "holdout_frac" in message


def test_early_stopping_defaults(tiny_bert: Path) -> None:
    def strong(**options: Any):  # type: ignore[no-untyped-def]
        return resolved_models(parse_spec(spec_dict(tiny_bert, **options)))["ceiling"][1]

    assert (strong().holdout_frac, strong().early_stopping_patience) == (0.0, 0)  # off by default
    patience_only = strong(early_stopping_patience=5)
    assert (patience_only.holdout_frac, patience_only.early_stopping_patience) == (0.1, 5)
    holdout_only = strong(holdout_frac=0.2)
    assert (holdout_only.holdout_frac, holdout_only.early_stopping_patience) == (0.2, 3)


def test_students_inherit_regularisation_and_transfer_can_override_it(tiny_bert: Path) -> None:
    raw = spec_dict(tiny_bert, weight_decay=0.1, holdout_frac=0.2)
    models = resolved_models(parse_spec(raw))
    assert (models["student"][1].weight_decay, models["student"][1].holdout_frac) == (0.1, 0.2)
    models = resolved_models(parse_spec({**raw, "transfer": {"weight_decay": 0.0, "holdout_frac": 0.0}}))
    assert (models["student"][1].weight_decay, models["student"][1].holdout_frac) == (0.0, 0.0)
    assert models["student"][1].early_stopping_patience == 0


# ------------------------------------------------------------------------------------------------------
# Training


def test_weight_decay_shrinks_the_head() -> None:
    features, labels = noisy_problem()
    norms = []
    for decay in (0.0, 0.5):
        torch.manual_seed(0)
        model = Linear(features.shape[1])
        config = probe_config(epochs=30, lr=1e-2, batch_size=20, minibatch_size=20, weight_decay=decay)
        fit(model, FeatureData(features), labels, config, build_loss("xent", {}), device=CPU, seed=0)
        norms.append(float(model.head.weight.detach().norm()))
    assert norms[1] < 0.8 * norms[0]


def test_early_stopping_stops_when_the_holdout_loss_rises_and_keeps_the_best_weights() -> None:
    features, labels = noisy_problem()
    train_rows, held_rows = holdout_split(len(features), 0.25, seed=0)
    data = FeatureData(features)
    holdout = Holdout(Rows(data, held_rows), labels[held_rows], patience=2)
    config = probe_config(epochs=200, lr=5e-2, batch_size=25, minibatch_size=25)
    torch.manual_seed(0)
    model = Linear(features.shape[1])
    losses: list[float] = []

    watch = Holdout(holdout.data, holdout.labels, patience=10**6)

    def record(progress: Any) -> None:
        losses.append(holdout_loss(model, watch, batch_size=64, device=CPU, amp_dtype=None))

    result = fit(
        model,
        Rows(data, train_rows),
        labels[train_rows],
        config,
        build_loss("xent", {}),
        device=CPU,
        seed=0,
        holdout=holdout,
        callback=record,
    )
    steps_per_epoch = len(train_rows) // 25
    assert result.best_step is not None and result.steps < 200 * steps_per_epoch  # it stopped early
    assert result.steps == result.best_step + 2 * steps_per_epoch  # patience 2 epochs
    # The weights kept are the best epoch's: their held-out loss is the recorded minimum.
    kept = holdout_loss(model, holdout, batch_size=64, device=CPU, amp_dtype=None)
    assert kept == pytest.approx(result.holdout_loss, rel=1e-5)
    epoch_losses = losses[steps_per_epoch - 1 :: steps_per_epoch]
    assert kept == pytest.approx(min(epoch_losses), rel=1e-5) and kept < epoch_losses[-1]


def test_holdout_labels_are_the_stages_training_labels(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    # A student's hold-out is scored against the weak model's soft labels (all it may see), never
    # against ground truth.
    spec = parse_spec(spec_dict(tiny_bert, holdout_frac=0.25, early_stopping_patience=2))
    store = ArtifactStore(str(tmp_path / "store"))
    experiment = run_experiment(spec, store=store, data_dir=sst2_dir, device=CPU)
    student = next(s for s in experiment.stages if s.kind.startswith("student"))
    weak = next(s for s in experiment.stages if s.kind == "weak")
    assert student.best_step is not None and student.holdout_loss is not None
    soft_labels = store.get_array(weak.soft_labels)  # type: ignore[arg-type]
    _, held = holdout_split(len(soft_labels), 0.25, seed=0)
    p = np.clip(soft_labels[held], 1e-7, 1 - 1e-7)
    entropy = float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))
    # Cross-entropy against soft targets is at least their entropy; against hard 0/1 ground truth
    # the bound would be 0 and the weak labels' entropy would not bound it.
    assert student.holdout_loss >= entropy - 1e-6
    record = store.get_record(STAGES, student.key)
    assert record is not None and record["best_step"] == student.best_step


def test_no_holdout_leaves_stage_keys_unchanged(tiny_bert: Path, sst2_dir: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    plain = run_experiment(parse_spec(spec_dict(tiny_bert)), store=store, data_dir=sst2_dir, device=CPU)
    explicit = run_experiment(
        parse_spec(spec_dict(tiny_bert, holdout_frac=0.0, weight_decay=0.0)),
        store=store,
        data_dir=sst2_dir,
        device=CPU,
    )
    assert [s.key for s in plain.stages] == [s.key for s in explicit.stages]
    assert all(s.cached for s in explicit.stages)
    assert all(s.best_step is None for s in plain.stages)
