"""The GPU path, checked on the CPU: what precision weights train in, which numeric modes a stage
sets, how often the training loop waits for the device, and what it copies there.

Every test here failed on the code before it was written for (issue 16): hub checkpoints that
declare bf16 trained bf16 master weights, no deterministic or TF32 mode existed, emulated bf16
counted as bf16, and the loop read three values back from the device per minibatch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from w2s import train
from w2s.losses import build_loss
from w2s.models import load_classifier, weight_dtype
from w2s.spec import ModelSpec, parse_spec, resolve_training
from w2s.stages import StagePlan, device_for, resolve_precision
from w2s.train import TokenData, autocast_dtype, fit, numerics, one_hot, to_device


def concrete(spec: ModelSpec, precision: str) -> Any:
    """The spec's training config with the precision a stage would run in."""
    return dataclasses.replace(resolve_training(spec), dtype=precision)


def dtypes(parameters: Iterator[tuple[str, torch.nn.Parameter]]) -> set[torch.dtype]:
    return {p.dtype for _, p in parameters}


# ----------------------------------------------------------------------------------------------------
# Weights: float32 master weights whatever the checkpoint declares
# ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_declaring_bf16_trains_float32_weights_and_optimizer_state(
    tiny_llama_bf16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ModelSpec(model=str(tiny_llama_bf16), mode="full", batch_size=4, epochs=1, max_length=16)
    config = concrete(spec, "bfloat16")  # bf16 autocast, as on a GPU with dtype auto
    model = load_classifier(spec, config).model
    assert dtypes(model.named_parameters()) == {torch.float32}

    optimizers: list[torch.optim.Optimizer] = []
    make = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda p, c: optimizers.append(make(p, c)) or optimizers[-1])
    data = TokenData([[5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17]], pad_id=0)
    fit(model, data, one_hot([0, 1, 0, 1]), config, build_loss("xent"), device=torch.device("cpu"), seed=0)
    states = [t for state in optimizers[0].state.values() for t in state.values() if t.dim() > 0]
    assert states and {t.dtype for t in states} == {torch.float32}
    assert dtypes(model.named_parameters()) == {torch.float32}


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_lora_trains_float32_adapters_on_a_base_stored_in_the_stage_precision(
    tiny_llama_bf16: Path, precision: str
) -> None:
    spec = ModelSpec(model=str(tiny_llama_bf16), mode="lora")
    model = load_classifier(spec, concrete(spec, precision)).model
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert trained and frozen
    assert dtypes(iter(trained)) == {torch.float32}  # adapters and head
    expected = torch.bfloat16 if precision == "bfloat16" else torch.float32
    assert dtypes(iter(frozen)) == {expected}  # bf16 only where the stage computes in bf16


@pytest.mark.parametrize(
    ("precision", "expected"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)]
)
def test_a_probe_backbone_is_frozen_in_the_stage_precision(
    tiny_llama_bf16: Path, precision: str, expected: torch.dtype
) -> None:
    spec = ModelSpec(model=str(tiny_llama_bf16), mode="probe")
    model = load_classifier(spec, concrete(spec, precision)).model
    assert dtypes(model.backbone.named_parameters()) == {expected}
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_float32_is_honoured_for_full_fine_tuning(tiny_llama_bf16: Path) -> None:
    spec = ModelSpec(model=str(tiny_llama_bf16), mode="full", dtype="float32")
    assert dtypes(load_classifier(spec, concrete(spec, "float32")).model.named_parameters()) == {
        torch.float32
    }
    assert weight_dtype("full", "bfloat16") == torch.float32


def test_decoders_keep_no_key_value_cache(tiny_llama_bf16: Path) -> None:
    spec = ModelSpec(model=str(tiny_llama_bf16), mode="probe")
    backbone = load_classifier(spec, concrete(spec, "float32")).model.backbone.eval()
    assert backbone.config.use_cache is False
    with torch.no_grad():
        output = backbone(input_ids=torch.tensor([[5, 6, 7]]))
    assert getattr(output, "past_key_values", None) is None


# ----------------------------------------------------------------------------------------------------
# Numeric modes: deterministic kernels, TF32, native bf16
# ----------------------------------------------------------------------------------------------------


def test_numerics_sets_and_restores_deterministic_and_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())
    with numerics("tf32", deterministic=True):
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == train.CUBLAS_DETERMINISTIC_WORKSPACE
    assert (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()) == before
    with numerics("float32", deterministic=False):
        assert torch.get_float32_matmul_precision() == "highest"  # exact float32 when asked for it
        assert not torch.are_deterministic_algorithms_enabled()


def test_the_reference_preset_asks_for_deterministic_kernels_and_stages_run_under_them(
    tiny_gpt2: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    from w2s.splits import prepare_seed_data
    from w2s.stages import plan_seed, run_stage
    from w2s.store import ArtifactStore

    spec = parse_spec(
        {
            "preset": "reference",
            "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
            "weak": {"model": str(tiny_gpt2), "lr": 1e-3, "max_length": 32, "batch_size": 8},
            "strong": {"model": str(tiny_gpt2), "lr": 1e-3, "max_length": 32, "batch_size": 8},
        }
    )
    plan = plan_seed(spec, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu")[0]
    assert plan.config.deterministic
    seen: list[bool] = []

    def watch(progress: Any) -> None:
        seen.append(torch.are_deterministic_algorithms_enabled())

    run_stage(plan, ArtifactStore(str(tmp_path / "store")), callback=watch)
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()  # restored for the next stage
    default = parse_spec({**spec.model_dump(exclude={"preset"}), "seeds": [0]})
    assert not resolve_training(default.weak).deterministic


def test_tf32_is_a_gpu_mode_and_float32_on_the_cpu() -> None:
    assert resolve_precision("tf32", "cuda") == "tf32"
    assert resolve_precision("tf32", "cpu") == "float32"
    assert autocast_dtype("tf32", torch.device("cpu")) is None


def _fake_gpu_with_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-Ampere GPU: torch says bf16 is supported, but only by emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)


def test_emulated_bf16_does_not_count_as_bf16(monkeypatch: pytest.MonkeyPatch, tiny_gpt2: Path) -> None:
    _fake_gpu_with_emulated_bf16(monkeypatch)
    assert autocast_dtype("auto", torch.device("cuda")) is None  # float32 rather than slow emulation
    spec = ModelSpec(model=str(tiny_gpt2))
    plan = StagePlan(
        kind="weak",
        seed=0,
        model=spec,
        config=concrete(spec, "bfloat16"),
        train=None,  # type: ignore[arg-type]
        test=None,  # type: ignore[arg-type]
        loss=None,  # type: ignore[arg-type]
        device_kind="cuda",
    )
    with pytest.raises(train.StageError, match="no hardware for"):
        device_for(plan)


# ----------------------------------------------------------------------------------------------------
# The loop's traffic with the device
# ----------------------------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")
W2S_DIR = str(Path(train.__file__).parent)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every read of a tensor's value by the w2s code (on a GPU each one waits for the device to
    finish what was queued). Reads inside transformers and torch are not w2s's to remove: the
    optimizer's step counter lives on the host, and transformers checks the mask once per forward."""
    import sys

    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original) -> Any:
            caller = sys._getframe(1)
            while caller is not None and caller.f_code.co_filename.endswith("torch/_tensor.py"):
                caller = caller.f_back
            if caller is not None and caller.f_code.co_filename.startswith(W2S_DIR):
                reads.append(f"{_name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_training_reads_from_the_device_once_per_step(
    tiny_gpt2: Path, padding_side: str, host_reads: list[str]
) -> None:
    spec = ModelSpec(model=str(tiny_gpt2), batch_size=8, minibatch_size=2, epochs=1, max_length=16)
    config = concrete(spec, "float32")
    model = load_classifier(spec, config).model
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 300, size=int(n)).tolist() for n in rng.integers(3, 12, size=24)]
    data = TokenData(rows, pad_id=0, padding_side=padding_side)
    steps: list[int] = []

    def count(progress: Any) -> None:
        steps.append(len(host_reads))

    host_reads.clear()
    fit(model, data, one_hot([i % 2 for i in range(24)]), config, build_loss("xent"),
        device=torch.device("cpu"), seed=0, callback=count)  # fmt: skip
    assert len(steps) == 3  # 24 rows / batch 8, each step 4 minibatches
    per_step = np.diff([0, *steps])
    assert per_step.tolist() == [1, 1, 1], host_reads


def test_copies_to_a_gpu_are_pinned_and_do_not_block(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin", None)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", k)) or self)
    to_device(torch.ones(2), torch.device("cuda"))
    assert calls == [("pin", None), ("to", {"non_blocking": True})]
    calls.clear()
    to_device(torch.ones(2), torch.device("cpu"))
    assert calls == [("to", {})]  # nothing to pin on the CPU


def test_collation_says_on_the_host_whether_a_batch_is_left_padded() -> None:
    data = TokenData([[1, 2, 3], [4]], pad_id=0, padding_side="left")
    assert data.collate([0, 1], torch.device("cpu"))["left_padded"] is True
    assert data.collate([0], torch.device("cpu"))["left_padded"] is False
    right = TokenData([[1, 2, 3], [4]], pad_id=0, padding_side="right")
    assert right.collate([0, 1], torch.device("cpu"))["left_padded"] is False


# ----------------------------------------------------------------------------------------------------
# Probe heads on a CPU worker, on features a GPU computed
# ----------------------------------------------------------------------------------------------------


def test_a_probe_student_trains_its_head_on_features_another_device_kind_computed(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    from w2s.splits import prepare_seed_data
    from w2s.stages import STAGES, _Backbone, cached_features, plan_seed, run_stage
    from w2s.store import ArtifactStore

    options = {"mode": "probe", "max_length": 32, "batch_size": 16, "epochs": 3}
    spec = parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 60, "n_test": 20},
            "weak": {"model": str(tiny_bert), **options},
            "strong": {"model": str(tiny_bert), **options},
        }
    )
    data = prepare_seed_data(spec, 0, sst2_dir)
    plans = {p.kind: p for p in plan_seed(spec, data, device_kind="cuda", probe_head_device_kind="cpu")}
    weak, ceiling, student = plans["weak"], plans["ceiling"], plans["student:xent"]
    assert (weak.device_kind, ceiling.device_kind) == ("cuda", "cuda")  # features need the backbone
    assert (student.device_kind, student.feature_device_kind, student.features_from) == (
        "cpu",
        "cuda",
        "ceiling",
    )
    assert student.key != plan_seed(spec, data, device_kind="cuda")[2].key  # its own computation

    store = ArtifactStore(str(tmp_path / "store"))
    # What the weak stage on a GPU leaves for the student: soft labels of half B.
    blob = store.put_array(np.full(len(data.train_b), 0.7))
    store.put_record(STAGES, weak.key, {"key": weak.key, "soft_labels": blob})
    with pytest.raises(train.StageError, match="no stored probe features from a cuda worker"):
        run_stage(student, store)  # the ceiling has not run: the CPU never computes GPU features

    # The ceiling's features, stored under the GPU's feature space (computed here on the CPU).
    backbone = _Backbone(ceiling, torch.device("cpu"))
    for texts in (ceiling.train, ceiling.test):
        cached_features(backbone, texts, store)
    result = run_stage(student, store)
    assert result.steps > 0 and 0.0 <= result.accuracy <= 1.0


def test_a_student_whose_features_differ_from_its_ceilings_keeps_its_head_with_them(
    tiny_bert: Path, sst2_dir: Path
) -> None:
    """A transfer override of max_length (or a full-mode ceiling) means the ceiling computes other
    features: the student then computes its own, on the GPU."""
    from w2s.splits import prepare_seed_data
    from w2s.stages import plan_seed

    options = {"mode": "probe", "max_length": 32, "batch_size": 16}
    for transfer, strong_mode in (({"max_length": 24}, "probe"), ({"mode": "probe"}, "full")):
        spec = parse_spec(
            {
                "dataset": {"name": "sst2", "n_train": 60, "n_test": 20},
                "weak": {"model": str(tiny_bert), **options},
                "strong": {"model": str(tiny_bert), **options, "mode": strong_mode},
                "transfer": transfer,
            }
        )
        data = prepare_seed_data(spec, 0, sst2_dir)
        student = plan_seed(spec, data, device_kind="cuda", probe_head_device_kind="cpu")[2]
        assert (student.device_kind, student.feature_device_kind) == ("cuda", None)
