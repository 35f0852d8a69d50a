"""The whole experiment with tiny random models: every mode and loss, cache, probe features, cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import offline_model_dir, shared_data_dir
from w2s import stages, train
from w2s.losses import loss_names
from w2s.pipeline import run_experiment
from w2s.spec import parse_spec
from w2s.splits import prepare_seed_data
from w2s.stages import STAGES, StageCancelled, plan_weak, run_stage
from w2s.store import ArtifactStore


def tiny_spec(weak: Path, strong: Path, mode: str = "full", **overrides: Any) -> dict[str, Any]:
    options = {"mode": mode, "epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 120, "n_test": 40, "seed": 0},
        "weak": {"model": str(weak), **options},
        "strong": {"model": str(strong), **options},
        "losses": ["xent"],
        "seeds": [0],
    }
    spec.update(overrides)
    return spec


def check_results_shape(results: dict[str, Any], losses: list[str], seeds: int) -> None:
    for model in ("weak", "ceiling"):
        assert 0.0 <= results[model]["accuracy"] <= 1.0
        assert "auroc" in results[model] and "accuracy_ci" in results[model]
    assert sorted(results["students"]) == sorted(losses)
    for figures in results["students"].values():
        assert {"accuracy", "auroc", "pgr", "agreement_with_weak"} <= set(figures)
    assert results["seeds"] == seeds and len(results["per_seed"]) == seeds
    assert isinstance(results["flags"], list) and results["timings"]["total"] > 0
    json.dumps(results)  # the API serves this document as is


def test_full_pipeline_gpt2_weak_bert_strong_every_loss(
    tiny_gpt2: Path, tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    spec = parse_spec(tiny_spec(tiny_gpt2, tiny_bert, losses=loss_names(), seeds=[0, 1]))
    experiment = run_experiment(spec, store=ArtifactStore(str(tmp_path / "store")), data_dir=sst2_dir)
    check_results_shape(experiment.results, loss_names(), seeds=2)
    assert len(experiment.stages) == 2 * (2 + len(loss_names()))
    assert not any(stage.cached for stage in experiment.stages)
    manifest = experiment.manifest
    assert manifest["seeds"] == [0, 1]
    half_a = manifest["dataset"]["0"]["splits"]["train_a"]
    assert half_a["size"] == half_a["rows"] == 60 - half_a["overlap_removed"] - half_a["dropped_too_long"]
    assert len({s["key"] for s in manifest["stages"]}) == len(experiment.stages)


@pytest.mark.parametrize("mode", ["probe", "lora"])
def test_probe_and_lora_modes(
    mode: str,
    tiny_gpt2: Path,
    tiny_bert: Path,
    sst2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trained: list[dict[str, bool]] = []  # per stage: parameter name -> trainable
    real_fit = stages.fit

    def recording_fit(model: Any, *args: Any, **kwargs: Any) -> Any:
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        trained.append({name: param.requires_grad for name, param in model.named_parameters()})
        outcome = real_fit(model, *args, **kwargs)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in frozen)
        return outcome

    monkeypatch.setattr(stages, "fit", recording_fit)
    spec = parse_spec(tiny_spec(tiny_bert, tiny_gpt2, mode=mode, losses=["xent", "logconf"]))
    experiment = run_experiment(spec, store=ArtifactStore(str(tmp_path / "store")), data_dir=sst2_dir)
    check_results_shape(experiment.results, ["xent", "logconf"], seeds=1)
    assert len(trained) == 4  # weak, ceiling, two students
    for params in trained:
        trainable = {name for name, is_trainable in params.items() if is_trainable}
        if mode == "probe":
            # Only a head on cached features is trained: no backbone parameter is even in the model.
            assert trainable == set(params) == {"head.weight", "head.bias"}
        else:
            # LoRA: adapters and the head train; every pretrained backbone weight stays frozen.
            assert any("lora_" in name for name in trainable) and {"head.weight", "head.bias"} <= trainable
            assert all("lora_" in name or name.startswith("head.") for name in trainable)
            assert any(not is_trainable for is_trainable in params.values())


def test_same_spec_same_results_and_cache_hits_skip_work(
    tiny_gpt2: Path, tiny_bert: Path, sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(tiny_spec(tiny_bert, tiny_gpt2, losses=["xent", "product"]))
    first = run_experiment(spec, store=ArtifactStore(str(tmp_path / "a")), data_dir=sst2_dir)
    fresh = run_experiment(spec, store=ArtifactStore(str(tmp_path / "b")), data_dir=sst2_dir)
    assert first.results["per_seed"] == fresh.results["per_seed"]  # seeded: identical in a new store

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached stage was trained again")

    monkeypatch.setattr(stages, "fit", no_training)
    again = run_experiment(spec, store=ArtifactStore(str(tmp_path / "a")), data_dir=sst2_dir)
    assert all(stage.cached for stage in again.stages)
    assert again.results["per_seed"] == first.results["per_seed"]


def test_changed_hyperparameter_misses_the_cache(
    tiny_gpt2: Path, tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    run_experiment(parse_spec(tiny_spec(tiny_bert, tiny_gpt2)), store=store, data_dir=sst2_dir)
    changed = tiny_spec(tiny_bert, tiny_gpt2)
    changed["strong"]["lr"] = 5e-4
    rerun = run_experiment(parse_spec(changed), store=store, data_dir=sst2_dir)
    cached = {stage.kind: stage.cached for stage in rerun.stages}
    assert cached == {"weak": True, "ceiling": False, "student:xent": False}


def test_probe_mode_computes_each_texts_features_once_across_seeds_and_jobs(
    tiny_gpt2: Path, tiny_bert: Path, sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extracted: dict[str, list[str]] = {"bert": [], "gpt2": []}
    real = stages.extract_features

    def counting(model: Any, data: train.TokenData, **kwargs: Any) -> Any:
        kind = model.backbone.config.model_type
        extracted[kind] += [" ".join(map(str, ids)) for ids in data.ids]
        return real(model, data, **kwargs)

    monkeypatch.setattr(stages, "extract_features", counting)
    store = ArtifactStore(str(tmp_path / "store"))
    losses = ["xent", "logconf", "product"]
    spec = parse_spec(tiny_spec(tiny_bert, tiny_gpt2, mode="probe", losses=losses, seeds=[0, 1, 2]))
    run_experiment(spec, store=store, data_dir=sst2_dir)
    # Every seed draws its own sample, so the splits differ per seed; features are stored per text,
    # so each distinct text is extracted once per model: the weak model reads halves A and B and
    # the test set, the strong model half B and the test set.
    seeds = [prepare_seed_data(spec, seed, sst2_dir) for seed in spec.seeds]
    weak_texts = {t for d in seeds for part in (d.train_a, d.train_b, d.test) for t in part.texts}
    strong_texts = {t for d in seeds for part in (d.train_b, d.test) for t in part.texts}
    assert len(extracted["bert"]) == len(set(extracted["bert"])) == len(weak_texts)
    assert len(extracted["gpt2"]) == len(set(extracted["gpt2"])) == len(strong_texts)

    # Another job over more seeds extracts only the texts no earlier job saw.
    before = {kind: len(texts) for kind, texts in extracted.items()}
    more = parse_spec(tiny_spec(tiny_bert, tiny_gpt2, mode="probe", losses=["xent"], seeds=[0, 1, 2, 3]))
    run_experiment(more, store=store, data_dir=sst2_dir)
    fourth = prepare_seed_data(more, 3, sst2_dir)
    new_weak = {t for part in (fourth.train_a, fourth.train_b, fourth.test) for t in part.texts} - weak_texts
    assert len(extracted["bert"]) - before["bert"] == len(new_weak)


def test_cancel_through_the_callback_stores_nothing(tiny_bert: Path, sst2_dir: Path, tmp_path: Path) -> None:
    spec_dict = tiny_spec(tiny_bert, tiny_bert)
    spec_dict["weak"]["epochs"] = 5
    spec = parse_spec(spec_dict)
    store = ArtifactStore(str(tmp_path / "store"))
    plan = plan_weak(spec, 0, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu")
    seen: list[int] = []

    def stop_after_two(progress: train.Progress) -> bool:
        seen.append(progress.step)
        return progress.step < 2

    with pytest.raises(StageCancelled):
        run_stage(plan, store, callback=stop_after_two)
    assert seen == [1, 2]
    assert store.get_record(STAGES, plan.key) is None


def test_progress_reports_steps_loss_and_eval(tiny_bert: Path, sst2_dir: Path, tmp_path: Path) -> None:
    spec_dict = tiny_spec(tiny_bert, tiny_bert)
    spec_dict["weak"]["eval_every"] = 2
    spec = parse_spec(spec_dict)
    plan = plan_weak(spec, 0, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu")
    events: list[train.Progress] = []
    result = run_stage(plan, ArtifactStore(str(tmp_path / "s")), callback=lambda p: events.append(p) is None)
    assert [e.step for e in events] == list(range(1, result.steps + 1))
    assert all(e.total_steps == result.steps and np.isfinite(e.loss) and e.lr > 0 for e in events)
    expected_evals = list(range(2, result.steps + 1, 2)) + ([result.steps] if result.steps % 2 else [])
    assert [e.step for e in events if e.eval_accuracy is not None] == expected_evals


def test_unknown_model_directory_and_unreadable_model(tmp_path: Path, sst2_dir: Path) -> None:
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    spec = parse_spec(tiny_spec(bogus, bogus))
    with pytest.raises(ValueError, match="model: cannot load"):
        run_experiment(spec, store=ArtifactStore(str(tmp_path / "store")), data_dir=sst2_dir)


@pytest.mark.slow
def test_real_minilm_end_to_end_on_sst2(tmp_path: Path) -> None:
    data_dir, minilm = shared_data_dir(), offline_model_dir("all-MiniLM-L6-v2")
    if data_dir is None or minilm is None:
        pytest.skip("needs ../shared/data and `w2s models prepare-offline models all-MiniLM-L6-v2`")
    options = {"model": str(minilm), "max_length": 64}
    spec = parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 300, "n_test": 200},
            "weak": {**options, "mode": "probe"},
            "strong": {**options, "mode": "full", "epochs": 1, "lr": 5e-5, "batch_size": 16},
            "losses": ["xent", "logconf"],
        }
    )
    experiment = run_experiment(spec, store=ArtifactStore(str(tmp_path / "store")), data_dir=data_dir)
    results = experiment.results
    check_results_shape(results, ["xent", "logconf"], seeds=1)
    # Pretrained sentence features separate sentiment well above chance even with 150 examples.
    assert results["weak"]["accuracy"] > 0.6


def test_checkpoint_is_stored_and_loads(tiny_bert: Path, sst2_dir: Path, tmp_path: Path) -> None:
    import io

    import torch

    spec_dict = tiny_spec(tiny_bert, tiny_bert, mode="lora")
    spec_dict["weak"]["save_checkpoint"] = True
    spec = parse_spec(spec_dict)
    store = ArtifactStore(str(tmp_path / "store"))
    result = run_stage(plan_weak(spec, 0, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu"), store)
    assert result.checkpoint is not None
    state = torch.load(io.BytesIO(store.get_checkpoint(result.checkpoint)))
    assert "head.weight" in state and any("lora" in name for name in state)
    assert not any(name.endswith("base_layer.weight") for name in state)  # frozen weights left out


def test_feature_extraction_reports_progress_before_training(
    tiny_gpt2: Path, tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    events: list[tuple[str, Any]] = []

    class Recorder:
        def stage_started(self, plan: Any) -> None: ...

        def stage_progress(self, plan: Any, progress: Any) -> None:
            events.append((plan.kind, progress))

        def stage_finished(self, plan: Any, result: Any) -> None: ...

    spec = parse_spec(tiny_spec(tiny_bert, tiny_gpt2, mode="probe"))
    run_experiment(spec, store=ArtifactStore(str(tmp_path / "s")), data_dir=sst2_dir, reporter=Recorder())
    weak = [p for kind, p in events if kind == "weak"]
    extraction = [p for p in weak if p.phase == "features"]
    # Rows of each split the weak model reads, each to its end, all before its first training step.
    finished = {p.split for p in extraction if p.done == p.total}
    assert finished == {"half A", "half B", "test"} and all(p.rows_per_s > 0 for p in extraction)
    assert weak.index(extraction[-1]) < next(i for i, p in enumerate(weak) if p.phase == "train")
