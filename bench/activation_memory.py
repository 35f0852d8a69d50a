"""Activation memory: the estimator's coefficients, measured, and how well they predict.

For each model family (GPT-2, Llama, Gemma, BERT, MPNet) a few random-initialised shapes are built
on the CPU and the bytes autograd saves for backward per token are counted
(w2s/memory_calibration.py), under bf16 autocast and in float32, for full fine-tuning and LoRA.
``--fit`` fits ``w2s.memory.ACTIVATION_COEFFICIENTS`` to the *fit* shapes and prints the table to
paste into w2s/memory.py. Every run then checks the coefficients in w2s/memory.py against
*held-out* shapes (other widths, depths, head counts, MLP ratios and sequence lengths) and prints
the error of each, plus the estimator's total for real model sizes (no weights needed).

    python bench/activation_memory.py [--fit] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from w2s.memory import ACTIVATION_COEFFICIENTS, ModelShape, activation_bytes_per_token, estimate
from w2s.memory_calibration import CalibrationShape, Measurement, fit, measure
from w2s.spec import ModelSpec, resolve_training

S = CalibrationShape
FIT_SHAPES: dict[str, list[CalibrationShape]] = {
    family: [
        S(family, 64, 2, 4, 2 if gqa else 4, 172),
        S(family, 128, 2, 4, 4, 344),
        S(family, 96, 3, 6, 2 if gqa else 6, 512),
        S(family, 64, 6, 2, 1 if gqa else 2, 256),
        S(family, 32, 1, 2, 2, 64),
    ]
    for family, gqa in (("gpt2", False), ("llama", True), ("gemma", True), ("bert", False), ("mpnet", False))
}
FIT_SEQS = (32, 96)
# Shapes and lengths the fit never saw: the test of the coefficients.
HELD_OUT: list[tuple[CalibrationShape, int]] = [
    (S("gpt2", 160, 3, 5, 5, 640), 48),
    (S("gpt2", 64, 5, 8, 8, 128), 128),
    (S("llama", 160, 2, 10, 5, 432), 48),
    (S("llama", 64, 4, 2, 1, 256), 128),
    (S("gemma", 160, 2, 5, 1, 640), 48),
    (S("gemma", 64, 4, 8, 4, 128), 128),
    (S("bert", 160, 3, 5, 5, 320), 48),
    (S("mpnet", 160, 2, 10, 10, 640), 128),
]
PRECISIONS = {"half": "bfloat16", "float32": "float32"}
MODES = ("full", "lora")


def model_shape_of(shape: CalibrationShape) -> ModelShape:
    from w2s.memory import shape_of
    from w2s.memory_calibration import build_classifier

    model = build_classifier(shape)
    return shape_of(model.backbone.config, model.backbone)


def predicted(measurement: Measurement) -> float:
    shape = model_shape_of(measurement.shape)
    return activation_bytes_per_token(shape, measurement.precision, measurement.mode, measurement.seq)[0]


def run_fit() -> dict[str, dict[tuple[str, str], tuple[float, ...]]]:
    table: dict[str, dict[tuple[str, str], tuple[float, ...]]] = {}
    for family, shapes in FIT_SHAPES.items():
        table[family] = {}
        for half, precision in PRECISIONS.items():
            for mode in MODES:
                measured = [measure(shape, precision, mode, seq) for shape in shapes for seq in FIT_SEQS]
                table[family][half, mode] = fit(measured)
    return table


def check(rows: list[dict[str, object]]) -> float:
    worst = 0.0
    for shape, seq in HELD_OUT:
        for precision in PRECISIONS.values():
            for mode in MODES:
                measurement = measure(shape, precision, mode, seq)
                estimate_ = predicted(measurement)
                error = estimate_ / measurement.per_token - 1
                worst = max(worst, abs(error))
                rows.append(
                    {
                        "family": shape.family,
                        "shape": f"h{shape.hidden} L{shape.layers} heads{shape.heads}/{shape.kv_heads} "
                        f"mlp{shape.intermediate}",
                        "seq": seq,
                        "precision": precision,
                        "mode": mode,
                        "measured_bytes_per_token": round(measurement.per_token),
                        "estimated_bytes_per_token": round(estimate_),
                        "error": round(error, 4),
                    }
                )
                print(
                    f"{shape.family:6} {rows[-1]['shape']:32} seq {seq:4} {precision:9} {mode:5} "
                    f"measured {measurement.per_token:10.0f} B/token  estimated {estimate_:10.0f}  "
                    f"error {error:+.1%}"
                )
    return worst


# Real sizes (configs only): what the estimator says for the stages people run.
REAL = {
    "Qwen2.5-1.5B": ModelShape("qwen2", 1_543_714_304, 1_310_000_000, 1536, 28, 8960, 12, 2, 128, True),
    "gpt2-large": ModelShape("gpt2", 774_030_080, 707_788_800, 1280, 36, 5120, 20, 20, 64, True),
}


def real_sizes(rows: list[dict[str, object]]) -> None:
    for name, shape in REAL.items():
        for minibatch, length in ((32, 512), (32, 1023), (8, 1024)):
            options = ModelSpec(
                model="x", mode="full", minibatch_size=minibatch, batch_size=32, max_length=length
            )
            config = resolve_training(options)
            config = dataclasses.replace(config, dtype="bfloat16")
            found = estimate(shape, config)
            rows.append(
                {"model": name, "minibatch": minibatch, "max_length": length, "total_gib": found.total}
            )
            print(f"{name:14} full, bf16 autocast, minibatch {minibatch} x {length}: {found.describe()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fit", action="store_true", help="refit the coefficients and print them")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    if args.fit:
        table = run_fit()
        print("ACTIVATION_COEFFICIENTS = {")
        for family, entries in table.items():
            print(f'    "{family}": {{')
            for (half, mode), values in entries.items():
                print(f'        ("{half}", "{mode}"): {values},')
            print("    },")
        print("}")
        ACTIVATION_COEFFICIENTS.clear()
        ACTIVATION_COEFFICIENTS.update(table)  # type: ignore[arg-type]
    rows: list[dict[str, object]] = []
    worst = check(rows)
    print(f"held-out shapes: worst error {worst:.1%} (target within 20%)")
    sizes: list[dict[str, object]] = []
    real_sizes(sizes)
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"held_out": rows, "worst_error": worst, "real_sizes": sizes}, indent=2)
        )


if __name__ == "__main__":
    main()
