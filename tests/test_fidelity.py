"""The pipeline computes what the paper's method says: checks against openai/weak-to-strong's formulas
and choices, and settings that must not change a result (minibatch size, worker device, reruns).

Each test drives the library's public interface (``run_experiment``, ``prepare_seed_data``, ``fit``,
``build_results``, stage plans) and would fail on the version before these fixes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_sentence, registered_losses, shared_data_dir
from w2s import stages
from w2s.losses import _REGISTRY, build_loss, loss_names
from w2s.models import Classifier, load_classifier
from w2s.pipeline import run_experiment
from w2s.results import SeedPredictions, build_results
from w2s.spec import ModelSpec, SpecError, TrainConfig, parse_spec, resolve_training, resolved_models
from w2s.splits import DataError, prepare_seed_data
from w2s.stages import STAGES, plan_seed, plan_weak
from w2s.store import ArtifactStore
from w2s.train import FeatureData, NonFiniteLoss, Progress, fit, soft, tokenize

CPU = torch.device("cpu")


def tiny_spec(weak: Path, strong: Path, **overrides: Any) -> dict[str, Any]:
    options = {"mode": "full", "epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 32}
    spec: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 40, "seed": 0},
        "weak": {"model": str(weak), **options},
        "strong": {"model": str(strong), **options},
        "losses": ["xent"],
        "seeds": [0],
    }
    spec.update(overrides)
    return spec


def write_rows(folder: Path, split: str, rows: list[tuple[str, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w") as handle:
        for idx, (sentence, label) in enumerate(rows):
            handle.write(json.dumps({"sentence": sentence, "label": label, "idx": idx}) + "\n")


# ------------------------------------------------------------------------------------------------------
# 1. Gradient accumulation: every loss sees the whole optimizer batch
# ------------------------------------------------------------------------------------------------------


class Linear2(nn.Module):
    """A plain linear classifier on fixed features (what a probe trains)."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.head = nn.Linear(dim, 2, bias=bias)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.5, generator=generator)
            if bias:
                self.head.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def _config(**changes: Any) -> TrainConfig:
    base = resolve_training(ModelSpec(model="gpt2", mode="probe", lr=0.05, epochs=3, batch_size=8))
    return dataclasses.replace(base, dtype="float32", **changes)


def _fit_params(loss_name: str, minibatch: int, params: dict[str, Any] | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(40, 6, generator=generator)
    weak = torch.sigmoid(features[:, 0] * 2 + torch.randn(40, generator=generator))
    model = Linear2(6)
    fit(
        model,
        FeatureData(features),
        soft(weak.numpy()),
        _config(minibatch_size=minibatch),
        build_loss(loss_name, params or {}),
        device=CPU,
        seed=0,
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_name", loss_names())
def test_every_loss_trains_the_same_parameters_at_any_minibatch_size(loss_name: str) -> None:
    full = _fit_params(loss_name, 8)
    for minibatch in (4, 2, 1):
        assert torch.allclose(_fit_params(loss_name, minibatch), full, atol=1e-5), (loss_name, minibatch)


@dataclasses.dataclass(frozen=True)
class BatchCentredLoss:
    """A plug-in that declares its batch statistic: cross entropy of logits centred on the batch mean."""

    def batch_statistics(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> dict:
        return {"centre": logits.float().mean(dim=0)}

    def __call__(self, logits, labels, step_frac, stats=None):  # type: ignore[no-untyped-def]
        stats = stats or self.batch_statistics(logits.detach(), labels, step_frac)
        return nn.functional.cross_entropy(logits.float() - stats["centre"], labels.float())


@dataclasses.dataclass(frozen=True)
class UndeclaredBatchLoss:
    """A plug-in that uses its batch's mean without declaring it."""

    def __call__(self, logits, labels, step_frac):  # type: ignore[no-untyped-def]
        centred = logits.float() - logits.float().mean(dim=0).detach()
        return nn.functional.cross_entropy(centred, labels.float())


@pytest.fixture(autouse=True)
def plugin_losses() -> Iterator[None]:
    with registered_losses(
        test_batch_centred=BatchCentredLoss,
        test_undeclared_batch_stat=UndeclaredBatchLoss,
        test_nan_after_two=NanAfterTwoSteps,
    ):
        yield


def test_a_plugin_that_declares_batch_statistics_is_minibatch_invariant() -> None:
    full = _fit_params("test_batch_centred", 8)
    assert torch.allclose(_fit_params("test_batch_centred", 1), full, atol=1e-5)


def test_a_plugin_using_undeclared_batch_statistics_is_refused_under_accumulation(
    tiny_bert: Path,
) -> None:
    _fit_params("test_undeclared_batch_stat", 8)  # fine without accumulation
    with pytest.raises(ValueError, match="changes when a batch is split into minibatches"):
        _fit_params("test_undeclared_batch_stat", 2)
    spec = tiny_spec(tiny_bert, tiny_bert, losses=["test_undeclared_batch_stat"])
    spec["transfer"] = {"minibatch_size": 2}
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    message = str(caught.value)
    assert "losses[0]" in message and "batch_statistics" in message and "transfer.minibatch_size" in message


def test_student_results_do_not_depend_on_minibatch_size(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    """Through the pipeline: the logconf student (quantile over the batch) with gradient accumulation
    down to minibatches of 1 predicts what the full-batch student predicts."""
    probs = {}
    for minibatch in (8, 1):
        spec = tiny_spec(tiny_bert, tiny_bert, losses=["logconf"])
        spec["transfer"] = {"minibatch_size": minibatch}
        experiment = run_experiment(
            parse_spec(spec), store=ArtifactStore(str(tmp_path / f"s{minibatch}")), data_dir=sst2_dir
        )
        student = next(s for s in experiment.stages if s.kind.startswith("student"))
        probs[minibatch] = ArtifactStore(str(tmp_path / f"s{minibatch}")).get_array(student.test_probs)
    # The predictions differ from row to row by far more than the tolerance, so the comparison below
    # could tell two students apart (a margin from 0.5 depended on the tiny model's random weights).
    assert np.ptp(probs[8]) > 20 * 2e-4
    np.testing.assert_allclose(probs[1], probs[8], atol=2e-4)


# ------------------------------------------------------------------------------------------------------
# The training loop, step for step, against the reference's
# ------------------------------------------------------------------------------------------------------


def _reference_loop(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, loss_name: str) -> None:
    """openai/weak-to-strong's train_model, restated: the dataset in order, repeated per epoch; every
    minibatch's logits stacked and the loss called once on the whole batch; torch Adam; cosine
    annealing over floor(len * epochs / batch) steps with no warm-up; the model in eval mode."""
    batch_size, minibatch_size, epochs, lr = 8, 2, 2, 0.05
    n = len(features)
    nsteps = n * epochs // batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, nsteps)
    loss_fn = build_loss(loss_name)
    stream = [i for _ in range(epochs) for i in range(n)]
    model.eval()
    for step in range(nsteps):
        logits, targets = [], []
        for m in range(batch_size // minibatch_size):
            start = step * batch_size + m * minibatch_size
            rows = stream[start : start + minibatch_size]
            logits.append(model(features[rows]))
            targets.append(labels[rows])
        loss = loss_fn(torch.cat(logits), torch.cat(targets), step / nsteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


@pytest.mark.parametrize("loss_name", ["xent", "logconf", "product"])
def test_reference_preset_trains_as_the_reference_loop(loss_name: str) -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(36, 5, generator=generator)
    labels = soft(torch.sigmoid(features[:, 1] * 3).numpy())
    config = dataclasses.replace(
        resolve_training(
            ModelSpec(model="gpt2", lr=0.05, batch_size=8, minibatch_size=2),
            "reference",
            parameter_count=lambda: 1,
        ),
        dtype="float32",
    )
    assert (config.steps_rounding, config.batch_order, config.warmup_frac) == ("down", "sequential", 0.0)
    ours, theirs = Linear2(5, bias=False), Linear2(5, bias=False)
    outcome = fit(ours, FeatureData(features), labels, config, build_loss(loss_name), device=CPU, seed=0)
    _reference_loop(theirs, features, labels, loss_name)
    assert outcome.steps == 36 * 2 // 8  # rounded down, as the reference
    assert torch.allclose(ours.head.weight, theirs.head.weight, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# 2. Over-long inputs: drop (default), left, right; counted; refused past the limit
# ------------------------------------------------------------------------------------------------------


def _long_tail_data(root: Path, n_long: int) -> Path:
    """sst2-like rows; n_long of the 60 test rows are long and carry their cue word only at the end."""
    rng = random.Random(5)
    train = [(make_sentence(rng, label), label) for label in [rng.randint(0, 1) for _ in range(120)]]
    test = []
    for i in range(60):
        label = rng.randint(0, 1)
        if i < n_long:
            filler = " ".join(rng.choice(["the", "movie", "plot", "and"]) for _ in range(60))
            test.append((f"{filler} {'great' if label else 'awful'}", label))
        else:
            test.append((make_sentence(rng, label), label))
    write_rows(root / "sst2", "train", train)
    write_rows(root / "sst2", "test", test)
    return root


def test_long_rows_are_dropped_by_default_and_counted(tiny_bert: Path, tmp_path: Path) -> None:
    data_dir = _long_tail_data(tmp_path / "data", n_long=6)
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert, dataset={"name": "sst2", "n_test": 60}))
    experiment = run_experiment(spec, store=ArtifactStore(str(tmp_path / "store")), data_dir=data_dir)
    test_counts = experiment.results["data"]["splits"]["test"]
    assert test_counts == {"rows": 54.0, "dropped_too_long": 6.0, "truncated": 0.0, "overlap_removed": 0.0}
    seed_data = prepare_seed_data(spec, 0, data_dir)
    assert len(seed_data.test) == 54 and max(len(text.split()) for text in seed_data.test.texts) < 20


def test_left_truncation_keeps_the_end_where_the_label_is(tiny_bert: Path, tmp_path: Path) -> None:
    data_dir = _long_tail_data(tmp_path / "data", n_long=30)
    model = ModelSpec(model=str(tiny_bert))
    tokenizer = load_classifier(model, resolve_training(model)).tokenizer
    text = "the movie plot and " * 20 + "great"
    left, right = tokenize(tokenizer, [text], 16, "left")[0], tokenize(tokenizer, [text], 16, "right")[0]
    assert len(left) == len(right) == 16
    assert tokenizer.decode(left, skip_special_tokens=True).endswith("great")
    assert "great" not in tokenizer.decode(right, skip_special_tokens=True)
    spec = tiny_spec(tiny_bert, tiny_bert, dataset={"name": "sst2", "n_test": 60})
    for role in ("weak", "strong"):
        spec[role]["truncation"] = "left"
    data = prepare_seed_data(parse_spec(spec), 0, data_dir)
    assert data.counts["test"].truncated == 30 and data.counts["test"].dropped_too_long == 0


def test_a_job_that_would_drop_too_much_is_refused_naming_split_count_and_limit(
    tiny_bert: Path, tmp_path: Path
) -> None:
    data_dir = _long_tail_data(tmp_path / "data", n_long=15)  # 25% of the test split
    spec = tiny_spec(tiny_bert, tiny_bert, dataset={"name": "sst2", "n_test": 60})
    with pytest.raises(DataError) as caught:
        run_experiment(parse_spec(spec), store=ArtifactStore(str(tmp_path / "s")), data_dir=data_dir)
    message = str(caught.value)
    assert "15 of 60 test rows" in message and "max_length 32" in message
    assert "max_dropped_fraction" in message and "'left'" in message
    spec["dataset"]["max_dropped_fraction"] = 0.3
    assert len(prepare_seed_data(parse_spec(spec), 0, data_dir).test) == 45


# ------------------------------------------------------------------------------------------------------
# 3. Dropout off while training unless asked
# ------------------------------------------------------------------------------------------------------


def _dropout_modes_during_fit(tiny_bert: Path, **options: Any) -> set[bool]:
    spec = ModelSpec(model=str(tiny_bert), batch_size=4, epochs=1, **options)
    config = dataclasses.replace(resolve_training(spec), dtype="float32")
    loaded = load_classifier(spec, config)
    model: Classifier = loaded.model
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert dropouts  # tiny BERT has dropout 0.1 in its config
    seen: set[bool] = set()
    ids = tokenize(loaded.tokenizer, ["a good film", "a bad film"] * 4, 16)

    def watch(progress: Progress) -> None:
        seen.update(m.training for m in dropouts)

    from w2s.train import TokenData

    data = TokenData(ids, loaded.tokenizer.pad_token_id)
    fit(
        model,
        data,
        soft(np.array([1.0, 0.0] * 4)),
        config,
        build_loss("xent"),
        device=CPU,
        seed=0,
        callback=watch,
    )
    return seen


def test_dropout_is_off_while_training_unless_asked(tiny_bert: Path) -> None:
    assert _dropout_modes_during_fit(tiny_bert) == {False}
    assert _dropout_modes_during_fit(tiny_bert, train_dropout=True) == {True}
    assert resolve_training(ModelSpec(model="x")).train_dropout is False


def test_gradient_checkpointing_still_runs_with_dropout_off(tiny_bert: Path) -> None:
    spec = ModelSpec(model=str(tiny_bert), gradient_checkpointing=True)
    model = load_classifier(spec, resolve_training(spec)).model
    from w2s.train import set_train_mode

    set_train_mode(model, dropout=False)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert layers and all(m.training for m in layers)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.Dropout))


# ------------------------------------------------------------------------------------------------------
# 4. PGR intervals never come from a biased subset
# ------------------------------------------------------------------------------------------------------


def _predictions(labels: np.ndarray, accuracies: dict[str, float], seed: int, rng: np.random.Generator):
    def model(accuracy: float) -> np.ndarray:
        right = rng.random(len(labels)) < accuracy
        p = rng.uniform(0.55, 0.95, len(labels))
        return np.where(right == (labels == 1), p, 1 - p)

    return SeedPredictions(
        seed, model(accuracies["weak"]), model(accuracies["ceiling"]), {"xent": model(accuracies["student"])}
    )


def _probs_right_on(labels: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.where(right == (labels == 1), 0.8, 0.2)


def test_pgr_interval_is_withheld_when_the_gap_is_not_resolved() -> None:
    labels = np.random.default_rng(0).integers(0, 2, 400)
    weak_right = np.arange(400) < 280  # 70%
    ceiling_right = weak_right.copy()
    ceiling_right[280:292] = True  # right where the weak model is wrong on 12 rows,
    ceiling_right[:8] = False  # wrong where it is right on 8: a gap of 4 rows in 400
    student_right = weak_right.copy()
    student_right[280:282] = True
    close = [
        SeedPredictions(
            0,
            _probs_right_on(labels, weak_right),
            _probs_right_on(labels, ceiling_right),
            {"xent": _probs_right_on(labels, student_right)},
        )
    ]
    results = build_results(close, labels, {})
    student = results["students"]["xent"]
    assert student["pgr_undefined_share"] > 0.05
    assert student["pgr_ci"] is None
    assert {"pgr_interval_withheld", "ceiling_weak_gap_not_significant"} <= set(results["flags"])
    low, high = results["gap"]["ceiling_minus_weak_ci"]
    assert low <= 0.0 <= high

    rng = np.random.default_rng(0)
    clear = [_predictions(labels, {"weak": 0.6, "ceiling": 0.9, "student": 0.8}, s, rng) for s in range(2)]
    results = build_results(clear, labels, {})
    student = results["students"]["xent"]
    assert student["pgr_undefined_share"] == 0.0 and student["pgr_ci"] is not None
    assert student["pgr_ci"][0] <= student["pgr"] <= student["pgr_ci"][1]
    assert not {"pgr_interval_withheld", "ceiling_weak_gap_not_significant"} & set(results["flags"])


def test_undefined_point_pgr_has_no_interval_and_undefined_seeds_are_counted() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    worse = [_predictions(labels, {"weak": 0.8, "ceiling": 0.7, "student": 0.75}, 0, rng)]
    results = build_results(worse, labels, {})
    assert results["students"]["xent"]["pgr"] is None and results["students"]["xent"]["pgr_ci"] is None
    mixed = [
        _predictions(labels, {"weak": 0.6, "ceiling": 0.9, "student": 0.8}, 0, rng),
        _predictions(labels, {"weak": 0.8, "ceiling": 0.7, "student": 0.75}, 1, rng),
    ]
    results = build_results(mixed, labels, {})
    per_seed = results["students"]["xent"]["pgr_per_seed"]
    assert per_seed[0] is not None and per_seed[1] is None
    assert results["per_seed"][1]["pgr"]["xent"] is None
    assert "pgr_undefined_for_some_seeds" in results["flags"]


def test_bootstrap_figures_match_a_direct_resample() -> None:
    """The vectorised joint bootstrap equals scoring each resample explicitly."""
    from w2s import metrics

    rng = np.random.default_rng(2)
    labels, scores = rng.integers(0, 2, 50), rng.random(50).round(1)  # ties
    for counts in metrics.bootstrap_counts(50, 20, seed=4, chunk=7):
        fast = metrics.weighted_auroc(counts, scores, labels)
        for row, fast_value in zip(counts, fast, strict=True):
            idx = np.repeat(np.arange(50), row)
            slow = metrics.auroc(scores[idx], labels[idx])
            assert (slow is None and np.isnan(fast_value)) or fast_value == pytest.approx(slow)


# ------------------------------------------------------------------------------------------------------
# 5. Overlap: no B row inside an A row, no trained row containing a test row
# ------------------------------------------------------------------------------------------------------


def _phrase_data(root: Path) -> Path:
    """Train rows that are sentences and phrases cut from them, as SST-2's train split is."""
    rng = random.Random(7)
    rows = []
    for _ in range(60):
        label = rng.randint(0, 1)
        sentence = make_sentence(rng, label)
        words = sentence.split()
        rows.append((sentence, label))
        rows.append((" ".join(words[: max(2, len(words) // 2)]), label))
    test = [(make_sentence(rng, label), label) for label in [rng.randint(0, 1) for _ in range(40)]]
    rows.append((test[0][0], test[0][1]))  # a test sentence inside the train split
    write_rows(root / "sst2", "train", rows)
    write_rows(root / "sst2", "test", test)
    return root


def test_overlapping_rows_are_removed_and_counted(tiny_bert: Path, tmp_path: Path) -> None:
    data_dir = _phrase_data(tmp_path / "data")
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert, dataset={"name": "sst2", "seed": 0}))
    data = prepare_seed_data(spec, 0, data_dir)
    padded = [f" {t} " for t in data.train_a.texts]
    assert not any(f" {b} " in a for b in data.train_b.texts for a in padded)
    test_texts = [f" {t} " for t in data.test.texts]
    trained = [f" {t} " for t in (*data.train_a.texts, *data.train_b.texts)]
    assert not any(t in row for t in test_texts for row in trained)
    removed = data.counts["train_a"].overlap_removed + data.counts["train_b"].overlap_removed
    assert data.counts["train_b"].overlap_removed > 5 and removed >= 6
    drawn = len(data.drawn.train_a) + len(data.drawn.train_b)
    assert len(data.train_a) + len(data.train_b) + removed == drawn
    kept = prepare_seed_data(
        parse_spec(tiny_spec(tiny_bert, tiny_bert, dataset={"name": "sst2", "remove_overlap": False})),
        0,
        data_dir,
    )
    assert len(kept.train_b) == len(data.drawn.train_b)


def test_real_sst2_halves_do_not_overlap(tiny_bert: Path) -> None:
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("needs ../shared/data")
    spec = parse_spec(
        tiny_spec(tiny_bert, tiny_bert, dataset={"name": "sst2", "n_train": 4000, "n_test": 500})
        | {
            "weak": {"model": str(tiny_bert), "max_length": 128},
            "strong": {"model": str(tiny_bert), "max_length": 128},
        }
    )
    data = prepare_seed_data(spec, 0, data_dir)
    assert data.counts["train_b"].overlap_removed > 100  # SST-2's phrases: about one in eight rows
    a_rows = [f" {' '.join(t.casefold().split())} " for t in data.train_a.texts]
    for b in data.train_b.texts:
        needle = f" {' '.join(b.casefold().split())} "
        assert not any(needle in a for a in a_rows)


# ------------------------------------------------------------------------------------------------------
# 6. Seeds redraw the sample and halves; the test set stays; reference sampling matches HF datasets
# ------------------------------------------------------------------------------------------------------


def test_each_seed_draws_its_own_sample_and_halves(tiny_bert: Path, sst2_dir: Path) -> None:
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert, seeds=[0, 1]))
    zero, one = prepare_seed_data(spec, 0, sst2_dir), prepare_seed_data(spec, 1, sst2_dir)
    assert set(zero.train_a.texts) != set(one.train_a.texts)
    assert set(zero.train_a.texts) | set(zero.train_b.texts) != set(one.train_a.texts) | set(
        one.train_b.texts
    )
    assert zero.test == one.test  # every seed is scored on the same rows
    fixed = parse_spec(tiny_spec(tiny_bert, tiny_bert, seeds=[0, 1]) | {})
    fixed = fixed.model_copy(
        update={"dataset": fixed.dataset.model_copy(update={"resample_per_seed": False})}
    )
    assert prepare_seed_data(fixed, 1, sst2_dir).train_a == prepare_seed_data(fixed, 0, sst2_dir).train_a


def test_reference_sampling_gives_the_reference_halves(tiny_bert: Path, tmp_path: Path) -> None:
    """openai/weak-to-strong draws with Hugging Face datasets: the first n rows, formatted in order
    with random.Random(seed), shuffle(seed), then train_test_split(test_size=0.5, seed)."""
    import datasets as hf

    from w2s.datasets import format_sciq

    rng = random.Random(0)
    rows = [
        {
            "question": f"question {i}?",
            "correct_answer": f"right {i}",
            **{f"distractor{k}": f"wrong {i}.{k}" for k in (1, 2, 3)},
            "support": None,
        }
        for i in range(50)
    ]
    rng.shuffle(rows)
    (tmp_path / "sciq").mkdir()
    for split in ("train", "test"):
        (tmp_path / "sciq" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in (0, 3):
        formatter_rng = random.Random(seed)

        def hf_format(row: dict[str, Any], rng: random.Random = formatter_rng) -> dict[str, Any]:
            text, label = format_sciq(row, rng)
            return {"txt": text, "hard_label": label}

        reference = hf.Dataset.from_list(rows).select(range(30)).map(hf_format).shuffle(seed=seed)
        halves = reference.train_test_split(test_size=0.5, seed=seed)
        spec = parse_spec(
            tiny_spec(tiny_bert, tiny_bert, seeds=[seed], preset="reference")
            | {"dataset": {"name": "sciq", "n_train": 30, "n_test": 10, "remove_overlap": False}}
            | {"weak": {"model": str(tiny_bert), "lr": 1e-3}, "strong": {"model": str(tiny_bert), "lr": 1e-3}}
        )
        data = prepare_seed_data(spec, seed, tmp_path)
        assert list(data.train_a.texts) == halves["train"]["txt"]
        assert list(data.train_b.texts) == halves["test"]["txt"]
        assert list(data.train_b.labels) == halves["test"]["hard_label"]


# ------------------------------------------------------------------------------------------------------
# 7. The head and the loss in float32
# ------------------------------------------------------------------------------------------------------


def test_head_runs_in_float32_inside_bf16_autocast(tiny_bert: Path) -> None:
    spec = ModelSpec(model=str(tiny_bert))
    loaded = load_classifier(spec, resolve_training(spec))
    model = loaded.model.eval()
    nn.init.normal_(model.head.weight, std=0.3)
    ids = tokenize(loaded.tokenizer, ["a good film", "the plot was dull and boring"], 16)
    from w2s.train import TokenData

    batch = TokenData(ids, loaded.tokenizer.pad_token_id).collate(range(2), CPU)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch)
        features = model.features(**batch)
    assert logits.dtype == torch.float32
    expected = features.float() @ model.head.weight.T + model.head.bias
    assert torch.equal(logits, expected) or torch.allclose(logits, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------
# 8. Stage keys: resolved precision, device kind and code
# ------------------------------------------------------------------------------------------------------


def test_keys_hash_the_resolved_precision_and_device_kind(tiny_bert: Path, sst2_dir: Path) -> None:
    auto = parse_spec(tiny_spec(tiny_bert, tiny_bert))
    data = prepare_seed_data(auto, 0, sst2_dir)
    cpu, cuda = (plan_weak(auto, 0, data, device_kind=kind) for kind in ("cpu", "cuda"))
    assert (cpu.config.dtype, cuda.config.dtype) == ("float32", "bfloat16")
    assert cpu.key != cuda.key  # a CPU float32 result never answers a GPU bf16 request
    explicit = tiny_spec(tiny_bert, tiny_bert)
    explicit["weak"]["dtype"] = "float32"
    assert plan_weak(parse_spec(explicit), 0, data, device_kind="cpu").key == cpu.key  # the same computation


@pytest.mark.parametrize(("build", "changes_keys"), [("2.13.0+cu128", False), ("2.12.1+cpu", True)])
def test_a_local_build_label_does_not_change_keys_a_version_does(
    build: str, changes_keys: bool, tiny_bert: Path, sst2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts of one cluster run torch 2.13.0+cpu and 2.13.0+cu128: before, their keys differed and a
    student on one host found no soft labels of a weak stage computed on the other."""
    from importlib import metadata

    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert))
    data = prepare_seed_data(spec, 0, sst2_dir)
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2.13.0+cpu" if name == "torch" else real(name))
    stages.library_versions.cache_clear()
    try:
        cpu_build = plan_weak(spec, 0, data, device_kind="cpu").key
        monkeypatch.setattr(metadata, "version", lambda name: build if name == "torch" else real(name))
        stages.library_versions.cache_clear()
        other_build = plan_weak(spec, 0, data, device_kind="cpu").key
    finally:
        monkeypatch.undo()
        stages.library_versions.cache_clear()
    assert (cpu_build != other_build) == changes_keys


def test_a_change_to_library_code_changes_every_key(
    tiny_bert: Path, sst2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert))
    data = prepare_seed_data(spec, 0, sst2_dir)
    before = [plan.key for plan in plan_seed(spec, data, device_kind="cpu")]
    real = stages.module_source
    monkeypatch.setattr(
        stages, "module_source", lambda name: real(name) + (b"\n# edited\n" if name == "w2s.train" else b"")
    )
    stages.library_code_hash.cache_clear()
    try:
        after = [plan.key for plan in plan_seed(spec, data, device_kind="cpu")]
    finally:
        monkeypatch.undo()
        stages.library_code_hash.cache_clear()
    assert not set(before) & set(after)


def test_editing_a_plugin_loss_changes_its_students_keys(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "my_losses.py"
    source = '''
import dataclasses
import torch.nn.functional as F
from w2s.losses import _REGISTRY, register_loss

_REGISTRY.pop("test_plugin_edit", None)


@register_loss("test_plugin_edit")
@dataclasses.dataclass(frozen=True)
class Mine:
    """A plug-in loss."""

    def __call__(self, logits, labels, step_frac):
        return F.cross_entropy(logits.float(), labels.float()) * SCALE
'''
    module.write_text(source.replace("SCALE", "1.0"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_losses", raising=False)
    monkeypatch.setattr("w2s.losses._REGISTRY", dict(_REGISTRY))  # the plug-in leaves with the test
    importlib.import_module("my_losses")
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert, losses=["xent", "test_plugin_edit"]))
    data = prepare_seed_data(spec, 0, sst2_dir)
    first = {plan.kind: plan.key for plan in plan_seed(spec, data, device_kind="cpu")}
    module.write_text(source.replace("SCALE", "2.0"))
    importlib.reload(sys.modules["my_losses"])
    second = {plan.kind: plan.key for plan in plan_seed(spec, data, device_kind="cpu")}
    assert first["student:test_plugin_edit"] != second["student:test_plugin_edit"]
    assert first["student:xent"] == second["student:xent"] and first["weak"] == second["weak"]


# ------------------------------------------------------------------------------------------------------
# 9. Non-finite training stops at once, storing nothing
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NanAfterTwoSteps:
    """Becomes NaN once training is past its first steps."""

    def __call__(self, logits, labels, step_frac):  # type: ignore[no-untyped-def]
        loss = nn.functional.cross_entropy(logits.float(), labels.float())
        return loss * float("nan") if step_frac >= 0.2 else loss


def test_a_non_finite_loss_stops_the_stage_with_the_step(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert, losses=["test_nan_after_two"]))
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(NonFiniteLoss, match=r"loss became non-finite at step \d+ of \d+"):
        run_experiment(spec, store=store, data_dir=sst2_dir)
    plans = plan_seed(spec, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu")
    assert store.get_record(STAGES, plans[-1].key) is None  # the student stored nothing


# ------------------------------------------------------------------------------------------------------
# The reference preset
# ------------------------------------------------------------------------------------------------------


def test_reference_preset_sets_the_reference_defaults_and_explicit_fields_win(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from transformers import GPT2Config

    large = tmp_path / "gpt2-xl-shaped"
    GPT2Config(n_embd=1600, n_layer=48, n_head=25).save_pretrained(large)  # 1.5B parameters, no weights
    spec = parse_spec(
        {
            "preset": "reference",
            "dataset": {"name": "sst2"},
            "weak": {"model": str(tiny_bert)},
            "strong": {"model": str(large), "epochs": 3},
            "transfer": {"lr": 2e-5},
        }
    )
    models = resolved_models(spec)
    weak, ceiling, student = (models[role][1] for role in ("weak", "ceiling", "student"))
    assert (weak.lr, ceiling.lr, student.lr) == (5e-5, 1e-5, 2e-5)  # by size; transfer.lr given
    assert (weak.epochs, ceiling.epochs) == (2, 3)  # strong.epochs given
    for config in (weak, ceiling, student):
        assert (config.batch_size, config.optimizer, config.lr_schedule, config.warmup_frac) == (
            32,
            "adam",
            "cosine",
            0,
        )
        assert (config.head_bias, config.train_dropout, config.truncation) == (False, False, "drop")
        assert (config.steps_rounding, config.batch_order, config.max_length) == ("down", "sequential", 1023)
    data = spec.data_config()
    assert (data.sampling, data.resample_per_seed, data.remove_overlap) == ("reference", True, True)
    own = resolve_training(ModelSpec(model="x"))
    assert (own.head_bias, own.steps_rounding, own.batch_order, own.warmup_frac) == (
        True,
        "up",
        "bucketed",
        0.05,
    )


@pytest.mark.parametrize(("half", "rows_of"), [(None, "train_b"), ("b", "train_b"), ("a", "train_a")])
def test_the_ceiling_learns_on_the_half_the_spec_names(
    half: str | None, rows_of: str, tiny_bert: Path, sst2_dir: Path
) -> None:
    """train_weak_to_strong.py trains the ceiling on half B (the default, and the preset's);
    train_simple.py/sweep.py on half A: ``ceiling_half`` offers both. The others never move."""
    spec = parse_spec(tiny_spec(tiny_bert, tiny_bert) | ({"ceiling_half": half} if half else {}))
    data = prepare_seed_data(spec, 0, sst2_dir)
    plans = {plan.kind: plan for plan in plan_seed(spec, data, device_kind="cpu")}
    assert plans["ceiling"].train.content_hash() == getattr(data, rows_of).content_hash()
    assert plans["weak"].train.content_hash() == data.train_a.content_hash()
    assert plans["student:xent"].train.content_hash() == data.train_b.content_hash()


def test_an_unknown_ceiling_half_is_refused_naming_the_field(tiny_bert: Path) -> None:
    with pytest.raises(SpecError, match="ceiling_half"):
        parse_spec(tiny_spec(tiny_bert, tiny_bert) | {"ceiling_half": "c"})
