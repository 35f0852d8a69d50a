"""The memory estimator against what training really keeps: bytes autograd saves for backward,
counted on the CPU for GPT-2-, Llama- and Gemma-shaped models of shapes the coefficients were not
fitted on (bench/activation_memory.py fits them), and the parts of the estimate by mode."""

from __future__ import annotations

import dataclasses

import pytest

from w2s.memory import ModelShape, activation_bytes_per_token, estimate, shape_of
from w2s.memory_calibration import CalibrationShape, build_classifier, measure
from w2s.spec import ModelSpec, resolve_training

S = CalibrationShape
# None of these is among bench/activation_memory.py's fit shapes: other widths, depths, head and
# key/value head counts, MLP ratios and lengths.
HELD_OUT = [
    (S("gpt2", 80, 3, 5, 5, 400), 40),
    (S("llama", 112, 3, 7, 1, 300), 40),
    (S("gemma", 48, 5, 4, 2, 200), 72),
    (S("mpnet", 80, 2, 4, 4, 160), 96),
]


@pytest.mark.parametrize(("shape", "seq"), HELD_OUT, ids=lambda v: getattr(v, "family", str(v)))
@pytest.mark.parametrize(
    ("precision", "mode"), [("bfloat16", "full"), ("float32", "full"), ("bfloat16", "lora")]
)
def test_activation_estimate_is_within_20_percent_of_what_autograd_saves(
    shape: CalibrationShape, seq: int, precision: str, mode: str
) -> None:
    model = build_classifier(shape, mode)
    measured = measure(shape, precision, mode, seq, model=model)
    predicted, _ = activation_bytes_per_token(
        shape_of(model.backbone.config, model.backbone), precision, mode, seq
    )
    assert predicted == pytest.approx(measured.per_token, rel=0.20), (measured, predicted)


def test_autocast_keeps_half_precision_copies_of_the_trained_weights() -> None:
    """The fixed part of what a bf16-autocast step saves is about 2 bytes per Linear weight: the
    estimate's 'autocast copies'."""
    shape = S("llama", 64, 2, 4, 2, 172)
    model = build_classifier(shape)
    found = shape_of(model.backbone.config, model.backbone)
    assert measure(shape, "bfloat16", model=model).fixed == pytest.approx(
        2 * found.linear_parameters, rel=0.2
    )
    assert measure(shape, "float32", model=model).fixed < 0.05 * 2 * found.linear_parameters


QWEN_1_5B = ModelShape("qwen2", 1_543_714_304, 1_310_000_000, 1536, 28, 8960, 12, 2, 128, True)


def config(**options: object) -> object:
    spec = ModelSpec(model="x", **options)  # type: ignore[arg-type]
    return dataclasses.replace(resolve_training(spec), dtype=str(options.get("dtype", "bfloat16")))


def test_full_fine_tuning_counts_float32_weights_gradients_adam_and_autocast_copies() -> None:
    found = estimate(QWEN_1_5B, config(mode="full", minibatch_size=32, max_length=512))
    gib = 1024**3
    assert found.weights == pytest.approx(QWEN_1_5B.parameters * 4 / gib, rel=1e-3)
    assert found.gradients == found.weights and found.optimizer == pytest.approx(2 * found.weights, rel=1e-3)
    assert found.autocast_copies == pytest.approx(QWEN_1_5B.linear_parameters * 2 / gib, rel=1e-3)
    # The reading of this stage: about 83 GiB in fact, where the old estimate said 47.
    assert 75 <= found.total <= 100, found.describe()


def test_lora_and_probe_hold_frozen_weights_in_the_stage_precision() -> None:
    gib = 1024**3
    lora = estimate(QWEN_1_5B, config(mode="lora", minibatch_size=8, max_length=512))
    assert lora.weights == pytest.approx(QWEN_1_5B.parameters * 2 / gib, rel=0.02)  # bf16 base
    assert lora.gradients < 0.05 * lora.weights and lora.autocast_copies < lora.gradients
    probe = estimate(QWEN_1_5B, config(mode="probe", minibatch_size=32, max_length=512))
    assert probe.gradients == probe.optimizer == probe.activations == 0
    float32_probe = estimate(
        QWEN_1_5B, config(mode="probe", minibatch_size=32, max_length=512, dtype="float32")
    )
    assert float32_probe.weights == pytest.approx(2 * probe.weights, rel=1e-3)


def test_gradient_checkpointing_and_minibatches_shrink_activations() -> None:
    base = estimate(QWEN_1_5B, config(mode="full", minibatch_size=32, max_length=512))
    checkpointed = estimate(
        QWEN_1_5B, config(mode="full", minibatch_size=32, max_length=512, gradient_checkpointing=True)
    )
    smaller = estimate(QWEN_1_5B, config(mode="full", minibatch_size=8, batch_size=32, max_length=512))
    assert checkpointed.activations < base.activations / 4
    assert smaller.activations == pytest.approx(base.activations / 4, rel=1e-3)
