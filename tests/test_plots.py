"""w2s.plots on its own: the sweep figure's data (gaps, zero ceilings, the weak models' line), the
SVG it draws, a job's curves, and importing the module without matplotlib."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from w2s import plots

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GRID = {
    "dataset": {"name": "sst2", "n_train": 40},
    "weak_models": ["gpt2", {"model": "./models/distilgpt2", "mode": "probe"}],
    "strong_models": ["gpt2-medium", {"model": "gpt2-large", "mode": "probe"}, "gpt2-xl"],
    "losses": ["xent", {"name": "logconf", "aux_coef": 0.5}],
}
DISTIL = "./models/distilgpt2"


def row(
    weak: str, strong: str, weak_acc: float | None, ceiling: float | None, students: dict[str, float | None]
) -> dict[str, Any]:
    """A row as GET /v1/sweeps/{id} has it (service.sweeps.SweepRow, as JSON)."""
    done = ceiling is not None
    return {
        "job_id": f"{weak}-{strong}",
        "weak_model": weak,
        "strong_model": strong,
        "status": "succeeded" if done else "queued",
        "weak_accuracy": weak_acc,
        "ceiling_accuracy": ceiling,
        "students": {loss: {"accuracy": acc, "pgr": None} for loss, acc in students.items()},
    }


LOGCONF = "logconf(aux_coef=0.5)"
TABLE = [
    row("gpt2", "gpt2-medium", 0.70, 0.80, {"xent": 0.75, LOGCONF: 0.77}),
    # A ceiling of exactly 0.0 is a figure, not a gap; the logconf student has no result.
    row("gpt2", "gpt2-large", 0.70, 0.0, {"xent": 0.60, LOGCONF: None}),
    row(DISTIL, "gpt2-medium", 0.65, 0.90, {"xent": 0.70, LOGCONF: 0.72}),
    # Still queued: no figures at all (a None ceiling is missing, not 0).
    row(DISTIL, "gpt2-large", None, None, {"xent": None, LOGCONF: None}),
    # The logconf student is absent from the row altogether.
    row(DISTIL, "gpt2-xl", 0.66, 0.95, {"xent": 0.80}),
    # No row for (gpt2, gpt2-xl): that job's points are gaps too.
]


def test_sweep_figure_data_by_hand() -> None:
    data = plots.sweep_figure_data(GRID, TABLE, name="family")
    assert data.title == "weak-to-strong on sst2 (family)"
    assert data.strong_models == ("gpt2-medium", "gpt2-large", "gpt2-xl")  # grid order
    assert [s.label for s in data.series] == [
        "gpt2 → student (xent)",
        f"gpt2 → student ({LOGCONF})",
        "distilgpt2 → student (xent)",
        f"distilgpt2 → student ({LOGCONF})",
        "gpt2 (weak supervisor)",
        "distilgpt2 (weak supervisor)",
        "strong ceiling",
    ]
    values = {s.label: s.values for s in data.series}
    assert values["gpt2 → student (xent)"] == (0.75, 0.60, None)
    assert values[f"gpt2 → student ({LOGCONF})"] == (0.77, None, None)
    assert values["distilgpt2 → student (xent)"] == (0.70, None, 0.80)
    assert values[f"distilgpt2 → student ({LOGCONF})"] == (0.72, None, None)
    # The weak model's own accuracy at each strong model: that job's weak figure.
    assert values["gpt2 (weak supervisor)"] == (0.70, 0.70, None)
    assert values["distilgpt2 (weak supervisor)"] == (0.65, None, 0.66)
    # gpt2-medium: (0.80 + 0.90) / 2; gpt2-large: the 0.0 counts, the queued job's None does not.
    ceiling = values["strong ceiling"]
    assert ceiling[0] == pytest.approx(0.85) and ceiling[1] == 0.0 and ceiling[2] == 0.95

    gpt2_xent = data.series_named("gpt2 → student (xent)")
    gpt2_logconf = data.series_named(f"gpt2 → student ({LOGCONF})")
    distil_xent = data.series_named("distilgpt2 → student (xent)")
    assert gpt2_xent.dash == () and gpt2_logconf.dash != ()  # xent solid, other losses dashed
    assert gpt2_xent.color == gpt2_logconf.color == plots.PALETTE[0] != distil_xent.color
    assert (gpt2_xent.weak_model, gpt2_xent.loss) == ("gpt2", "xent")
    weak_line = data.series_named("distilgpt2 (weak supervisor)")
    assert weak_line.role == "weak" and weak_line.color == distil_xent.color and weak_line.dash
    strong = data.series_named("strong ceiling")
    assert strong.role == "ceiling" and strong.color == "#000000" and strong.dash == ()
    assert data.x_labels == ["gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert not data.empty


def test_models_the_grid_does_not_name_are_appended_and_no_results_is_empty() -> None:
    extra = [*TABLE, row("gpt2", "/data/models/llama-3-8b", 0.71, 0.91, {"xent": 0.83})]
    data = plots.sweep_figure_data(GRID, extra)
    assert data.strong_models[-1] == data.x_labels[-1] == "llama-3-8b"
    assert data.series_named("gpt2 → student (xent)").values == (0.75, 0.60, None, 0.83)
    assert data.title == "weak-to-strong on sst2"

    nothing = plots.sweep_figure_data(GRID, [row("gpt2", "gpt2-medium", None, None, {"xent": None})])
    assert nothing.empty
    assert nothing.series_named("strong ceiling").values == (None, None, None)


def test_model_labels_name_the_options_a_grid_varies() -> None:
    minilm = "/models/all-MiniLM-L6-v2"
    entries = [
        {"model": minilm, "mode": "probe", "weight_decay": 0.0},
        {"model": minilm, "mode": "probe", "weight_decay": 0.1},
        {"model": minilm, "mode": "probe"},
        "gpt2",
        {"model": "gpt2"},  # the same as the string: told apart by number
    ]
    assert plots.model_labels(entries) == [
        "all-MiniLM-L6-v2 weight_decay=0.0",
        "all-MiniLM-L6-v2 weight_decay=0.1",
        "all-MiniLM-L6-v2 weight_decay=default",
        "gpt2 #1",
        "gpt2 #2",
    ]
    assert plots.model_labels(["gpt2", {"model": "gpt2-xl", "lr": 1e-5}]) == ["gpt2", "gpt2-xl"]


def test_a_sweep_varying_an_option_keeps_a_line_per_value() -> None:
    # One weak model listed twice with different weight decay, one strong model listed twice with
    # different early stopping: four jobs that the figure must not average into one point.
    weak = [{"model": "gpt2", "weight_decay": 0.0}, {"model": "gpt2", "weight_decay": 1.0}]
    strong = [{"model": "gpt2-xl"}, {"model": "gpt2-xl", "early_stopping_patience": 2}]
    grid = {**GRID, "weak_models": weak, "strong_models": strong}
    weak_labels, strong_labels = plots.model_labels(weak), plots.model_labels(strong)
    table = []
    for i, weak_label in enumerate(weak_labels):
        for j, strong_label in enumerate(strong_labels):
            entry = row("gpt2", "gpt2-xl", 0.6 + i / 10, 0.9, {"xent": 0.7 + i / 10 + j / 100})
            table.append({**entry, "weak_label": weak_label, "strong_label": strong_label})
    data = plots.sweep_figure_data(grid, table)
    assert data.x_labels == ["gpt2-xl early_stopping_patience=default", "gpt2-xl early_stopping_patience=2"]
    assert data.series_named("gpt2 weight_decay=0.0 → student (xent)").values == pytest.approx((0.7, 0.71))
    assert data.series_named("gpt2 weight_decay=1.0 → student (xent)").values == pytest.approx((0.8, 0.81))
    assert data.series_named("gpt2 weight_decay=1.0 (weak supervisor)").values == pytest.approx((0.7, 0.7))


def test_sweep_figure_draws_the_data() -> None:
    data = plots.sweep_figure_data(GRID, TABLE, name="family")
    figure = plots.sweep_figure(data)
    axes = figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {s.label for s in data.series}
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert axes.get_ylim() == (0.0, 1.0)
    ceiling = lines["strong ceiling"].get_ydata()
    assert ceiling[1] == 0.0 and ceiling[2] == 0.95  # 0.0 drawn as a point
    logconf = lines[f"gpt2 → student ({LOGCONF})"]
    assert math.isnan(logconf.get_ydata()[1])  # a gap, never a 0
    assert lines["gpt2 → student (xent)"].get_linestyle() == "-" and logconf.get_linestyle() != "-"


def test_the_sweep_figure_scales_to_its_data() -> None:
    close = [
        row("gpt2", "gpt2-medium", 0.78, 0.86, {"xent": 0.81, LOGCONF: 0.83}),
        row("gpt2", "gpt2-large", 0.79, 0.85, {"xent": 0.82, LOGCONF: 0.84}),
    ]
    low, high = plots.sweep_figure(plots.sweep_figure_data(GRID, close)).axes[0].get_ylim()
    assert 0.7 < low < 0.78 and 0.86 < high < 0.95  # 0.78-0.86 fills the axes
    assert plots.sweep_figure(plots.sweep_figure_data(GRID, [])).axes[0].get_ylim() == (0.0, 1.0)


def test_sweep_svg_is_small_deterministic_and_labelled() -> None:
    data = plots.sweep_figure_data(GRID, TABLE, name="family")
    svg = plots.render_sweep_svg(data)
    assert svg.startswith("<?xml") and "<svg" in svg
    for label in [s.label for s in data.series] + ["gpt2-medium", "test accuracy", "strong model"]:
        assert f">{label}</text>" in svg, label  # text stays text (svg.fonttype none)
    assert "weak-to-strong on sst2 (family)" in svg
    assert "<image" not in svg and len(svg) < 60_000
    assert plots.render_sweep_svg(plots.sweep_figure_data(GRID, TABLE, name="family")) == svg
    assert plots.render_sweep_png(data).startswith(PNG_MAGIC)
    assert "No results yet" in plots.render_sweep_svg(plots.sweep_figure_data(GRID, []))


def metric(stage_id: str, kind: str, seed: int, name: str, points: dict[int, float]) -> dict[str, Any]:
    """A series as GET /v1/jobs/{id}/metrics returns it."""
    return {
        "stage_id": stage_id,
        "kind": kind,
        "seed": seed,
        "name": name,
        "steps": list(points),
        "values": list(points.values()),
    }


SERIES = [
    metric("s3", "student:xent", 0, "loss", {2: 0.5, 1: 0.6}),  # out of order: drawn sorted
    metric("s3", "student:xent", 0, "train_accuracy", {1: 0.6, 2: 0.7}),
    metric("s1", "weak", 0, "eval_accuracy", {2: 0.66}),
    metric("s1", "weak", 0, "loss", {1: 0.9, 2: 0.7}),
    metric("s1", "weak", 0, "train_accuracy", {1: 0.55, 2: 0.65}),
    metric("s1", "weak", 0, "lr", {1: 1e-4}),  # not drawn
]


def test_curves_figure_data() -> None:
    data = plots.curves_figure_data(SERIES, order=["s1", "s2", "s3"])
    assert [(c.stage, c.metric) for c in data.loss] == [
        ("weak · seed 0", "loss"),
        ("xent student · seed 0", "loss"),
    ]
    xent_loss = data.loss[1]
    assert xent_loss.steps == (1, 2) and xent_loss.values == (0.6, 0.5)
    assert data.kinds == ("weak", "student:xent")  # the panels, in run order; "lr" is not drawn
    # A colour per seed, the same in every panel.
    assert data.loss[0].color == xent_loss.color == plots.PALETTE[0]
    assert [(c.stage, c.metric) for c in data.accuracy] == [
        ("weak · seed 0", "train_accuracy"),
        ("weak · seed 0", "eval_accuracy"),
        ("xent student · seed 0", "train_accuracy"),
    ]
    # Without the run order: per seed, weak, ceiling, then the students.
    unordered = plots.curves_figure_data(
        [*SERIES, metric("s4", "weak", 1, "loss", {1: 0.8}), metric("s5", "ceiling", 0, "loss", {1: 0.4})]
    )
    assert [c.stage for c in unordered.loss] == [
        "weak · seed 0",
        "ceiling · seed 0",
        "xent student · seed 0",
        "weak · seed 1",
    ]
    assert unordered.kinds == ("weak", "ceiling", "student:xent")
    assert unordered.loss[3].color == plots.PALETTE[1]


def test_ema_is_tensorboards_debiased_smoothing() -> None:
    assert plots.ema([1.0, 2.0, 3.0], 0.0) == (1.0, 2.0, 3.0)
    smoothed = plots.ema([2.0, 2.0, 2.0, 2.0], 0.9)
    assert smoothed == pytest.approx((2.0, 2.0, 2.0, 2.0))  # debiased: a constant stays itself
    # By hand: last = 0.5 * last + 0.5 * value, divided by 1 - 0.5 ** count.
    assert plots.ema([0.0, 1.0], 0.5) == pytest.approx((0.0, 0.5 / 0.75))
    step = plots.ema([0.0] * 5 + [1.0] * 5, 0.6)
    assert all(a <= b for a, b in itertools.pairwise(step)) and 0.0 < step[5] < 1.0
    with_gap = plots.ema([1.0, math.nan, 1.0], 0.5)
    assert with_gap[0] == 1.0 and math.isnan(with_gap[1]) and with_gap[2] == pytest.approx(1.0)


def noisy_job() -> list[dict[str, Any]]:
    """Two seeds of weak, ceiling and two students: noisy batch curves, an evaluation every 10 steps."""
    series = []
    for seed in (0, 1):
        for index, kind in enumerate(["weak", "ceiling", "student:xent", "student:logconf"]):
            stage = f"{kind}-{seed}"
            steps = range(1, 61)
            noise = [((step * 7919 + seed * 31 + index) % 13 - 6) / 60 for step in steps]
            loss = {step: 0.3 + 0.4 * 0.95**step + n for step, n in zip(steps, noise, strict=True)}
            accuracy = {step: 0.8 - 0.2 * 0.95**step + n / 2 for step, n in zip(steps, noise, strict=True)}
            evaluation = {step: 0.78 - 0.2 * 0.97**step for step in range(10, 61, 10)}
            series += [
                metric(stage, kind, seed, "loss", loss),
                metric(stage, kind, seed, "train_accuracy", accuracy),
                metric(stage, kind, seed, "eval_accuracy", evaluation),
            ]
    return series


def test_curves_are_a_panel_per_stage_kind_smoothed_over_faint_raw_points() -> None:
    data = plots.curves_figure_data(noisy_job())
    figure = plots.curves_figure(data, "loss", smoothing=0.8)
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == ["weak", "ceiling", "logconf student", "xent student"]
    for axes in panels:
        lines = axes.get_lines()
        assert len(lines) == 4  # two seeds, each raw (faint) and smoothed
        raw, smooth = lines[0], lines[1]
        assert raw.get_alpha() == plots.RAW_ALPHA and smooth.get_alpha() is None
        assert raw.get_color() == smooth.get_color() == plots.PALETTE[0]
        assert lines[2].get_color() == plots.PALETTE[1]
        # The smoothed line is the raw one's EMA, and calmer than it.
        assert tuple(smooth.get_ydata()) == pytest.approx(plots.ema(list(raw.get_ydata()), 0.8))
        assert _roughness(smooth.get_ydata()) < _roughness(raw.get_ydata()) / 2
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["seed 0", "seed 1", "smoothed (EMA 0.80)", "raw"]
    # One y scale for every panel, fitted to the data; no smoothing: one raw line per seed.
    assert len({axes.get_ylim() for axes in panels}) == 1
    assert [len(axes.get_lines()) for axes in plots.curves_figure(data, "loss", smoothing=0).axes[:1]] == [2]

    accuracy = plots.curves_figure(data, "accuracy")
    first = accuracy.axes[0]
    evaluation = [line for line in first.get_lines() if line.get_marker() == "o"]
    assert len(evaluation) == 2 and list(evaluation[0].get_xdata()) == [10, 20, 30, 40, 50, 60]
    assert list(evaluation[0].get_ydata()) == [p for p in noisy_job()[2]["values"]]  # never smoothed
    low, high = first.get_ylim()
    assert 0.4 < low < 0.6 and 0.85 < high <= 1.0  # the data's range, not 0-1
    assert "evaluation" in [text.get_text() for text in accuracy.legends[0].get_texts()]

    only = plots.curves_figure(data, "accuracy", kind="student:xent")
    assert [axes.get_title() for axes in only.axes] == ["xent student"]


def _roughness(values: Any) -> float:
    return sum(abs(b - a) for a, b in itertools.pairwise(values))


def test_curves_svgs() -> None:
    data = plots.curves_figure_data(SERIES, order=["s1", "s2", "s3"])
    loss = plots.render_curves_svg(data, "loss")
    accuracy = plots.render_curves_svg(data, "accuracy")
    assert ">Training loss</text>" in loss and ">training step</text>" in loss and ">loss</text>" in loss
    assert ">weak</text>" in loss and ">xent student</text>" in loss and ">raw</text>" in loss
    assert ">evaluation</text>" in accuracy and ">weak</text>" in accuracy
    assert "seed 0" not in loss  # one seed: colours need no legend
    assert plots.render_curves_svg(data, "loss") == loss
    assert plots.render_curves_svg(data, "loss", smoothing=0.3) != loss
    empty = plots.render_curves_svg(plots.curves_figure_data([]), "loss")
    assert "Waiting for the first training steps" in empty


def test_the_data_needs_no_matplotlib() -> None:
    program = f"""
import sys
sys.modules["matplotlib"] = None  # importing it now fails, as if it were not installed
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_plots import GRID, TABLE, SERIES
from w2s import plots
assert plots.sweep_figure_data(GRID, TABLE).series[0].values == (0.75, 0.60, None)
assert plots.curves_figure_data(SERIES).loss
try:
    plots.render_sweep_svg(plots.sweep_figure_data(GRID, TABLE))
except ImportError:
    print("drawing needs matplotlib")
"""
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "drawing needs matplotlib"
