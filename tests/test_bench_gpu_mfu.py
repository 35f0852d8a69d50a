"""bench/gpu_mfu.py: the smoke path (a tiny model through w2s.train.fit on the CPU) and the peak table,
so the GPU benchmark's code is exercised on machines without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_mfu.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_mfu", SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "mfu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "tokens/s:" in done.stdout
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["device"] == "cpu (smoke)"
    assert figures["timed_steps"] == 3 and figures["tokens_per_s"] > 0 and figures["step_s"] > 0
    # 6 x non-embedding parameters + 12 x layers x width x seq, per token.
    shape = figures["shape"]
    attention = 12 * shape["n_layer"] * shape["n_embd"] * shape["seq"]
    assert figures["flops_per_token"] == 6 * figures["params_non_embedding"] + attention
    assert figures["mfu"] is None  # no peak for a CPU


def test_peaks_come_from_the_device_name() -> None:
    bench = _load_bench()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert bench.peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert bench.peak_tflops("NVIDIA H200") == (989.0, "H200")
    assert bench.peak_tflops("NVIDIA H200 NVL") == (835.0, "H200 NVL")  # not the SXM part's 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert bench.peak_tflops("Tesla T4") is None


def test_gpt2_large_shape_counts_its_parameters() -> None:
    import torch

    bench = _load_bench()
    model = bench.build_classifier(bench.GPT2_LARGE, torch.device("meta"), seed=0)  # no memory used
    per_token, non_embedding = bench.flops_per_token(model, bench.GPT2_LARGE)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 774  # gpt2-large, no LM head
    assert round(non_embedding / 1e6) == 708
    assert 4.8e9 < per_token < 4.9e9
