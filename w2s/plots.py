"""The figures: a sweep's weak-to-strong plot (the paper's figure) and a job's training curves.

One definition of each figure's data, drawn with matplotlib for both the ``w2s sweep plot``
command and the dashboard, so the two always show the same numbers. The data functions read the
API's JSON (a sweep's ``grid`` and ``table``, a job's metric series) and need nothing else; the
``render_*`` functions draw them as SVG or PNG.

matplotlib is a service dependency, not the library's: it is imported inside the functions that
draw, so ``import w2s.plots`` works without it.

The sweep figure (test accuracy against the strong model, categorical in grid order):

- one line per (weak model, loss): the student's test accuracy, coloured by weak model, the
  ``xent`` student solid and every other loss dashed;
- the strong ceiling in black: per strong model, the mean ceiling accuracy over the rows that have
  one (a ceiling of 0.0 is a value; only None is missing);
- one dotted line per weak model, its own test accuracy. Rule: at each strong model, the weak
  accuracy measured by the job(s) of that (weak, strong) pair, i.e. the floor each student's PGR at
  that point was measured from; None where that job has no result yet.

A value the table does not have (a job still running, a student that did not run) is None, drawn
as a gap: a missing point is never shown as 0.
"""

from __future__ import annotations

import io
import json
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # matplotlib is optional: types only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Categorical colours, readable on white and told apart by most colour-blind readers (Tableau 10):
# weak models in the sweep figure, seeds in a job's curves, stages on the dashboard's timeline.
PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
CEILING_COLOR = "#000000"
SOLID: tuple[float, ...] = ()
# On/off lengths in points: the xent student is solid, every other loss takes one of these in turn.
LOSS_DASHES: list[tuple[float, ...]] = [(6.0, 3.0), (6.0, 2.0, 1.5, 2.0), (2.0, 2.0), (10.0, 3.0)]
WEAK_DASH: tuple[float, ...] = (1.0, 2.5)
EVAL_DASH: tuple[float, ...] = (5.0, 3.0)
SOLID_LOSS = "xent"

Format = Literal["svg", "png", "pdf"]
DPI = 100
# Applied while a figure is built and saved. Text stays text in SVG (small, and searchable); the
# hash salt makes SVG ids, and so the whole file, the same for the same figure.
STYLE: dict[str, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "w2s",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],  # each SVG text names them: keep it short
    "font.size": 9.0,
    "axes.titlesize": 11.0,
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
}
# rcParams are process-wide, so two threads (the API's threadpool) must not draw at once.
_DRAWING = threading.Lock()


def short_model(name: str) -> str:
    """A local model directory by its last part (``/data/models/all-MiniLM-L6-v2`` ->
    ``all-MiniLM-L6-v2``); hub ids (``openai-community/gpt2``) stay as they are."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return PurePosixPath(name.rstrip("/")).name or name
    return name


def dataset_label(grid: Mapping[str, Any]) -> str:
    """A grid's dataset by name; an uploaded or local dataset by its file name."""
    dataset = grid.get("dataset")
    name = dataset.get("name", "?") if isinstance(dataset, Mapping) else "?"
    if isinstance(name, Mapping):
        return PurePosixPath(str(name.get("path", "?"))).name
    return str(name)


def _model_name(entry: Any) -> str:
    # A grid names a model as a string or as {"model": ..., "mode": ...}.
    return str(entry.get("model", "")) if isinstance(entry, Mapping) else str(entry)


def _option_text(value: Any) -> str:
    if isinstance(value, Mapping | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def model_labels(entries: Sequence[Any]) -> list[str]:
    """A label per entry of a grid's ``weak_models`` or ``strong_models``, unique within the list:
    the model's short name, plus the options in which entries of the same model differ
    (``all-MiniLM-L6-v2 weight_decay=0.1``), since a sweep varies an option by listing one model
    with several values of it. Entries equal in every option get ``#2``, ``#3``..."""
    options = [
        {k: v for k, v in entry.items() if k != "model"} if isinstance(entry, Mapping) else {}
        for entry in entries
    ]
    names = [_model_name(entry) for entry in entries]
    labels: list[str] = []
    for i, name in enumerate(names):
        siblings = [options[j] for j, other in enumerate(names) if other == name]
        keys = sorted({k for o in siblings for k in o})
        differing = [k for k in keys if len({_option_text(o.get(k)) for o in siblings}) > 1]
        parts = [f"{k}={_option_text(options[i][k]) if k in options[i] else 'default'}" for k in differing]
        labels.append(" ".join([short_model(name), *parts]))
    counts = {label: labels.count(label) for label in labels}
    seen: dict[str, int] = {}
    numbered = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        numbered.append(f"{label} #{seen[label]}" if counts[label] > 1 else label)
    return numbered


def _ordered(*groups: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name for group in groups for name in group if name))


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return sum(numbers) / len(numbers) if numbers else None


# ---------------------------------------------------------------------------------------------
# The sweep figure


@dataclass(frozen=True)
class Series:
    """One line of a figure: a value per x position (None: no point there)."""

    label: str
    role: Literal["student", "ceiling", "weak"]
    values: tuple[float | None, ...]
    color: str
    dash: tuple[float, ...] = SOLID
    weak_model: str | None = None
    loss: str | None = None


@dataclass(frozen=True)
class SweepFigureData:
    title: str
    strong_models: tuple[str, ...]  # the x axis: the strong entries' labels (model_labels), in grid order
    series: tuple[Series, ...]  # students (by weak model, then loss), weak models, the ceiling

    @property
    def x_labels(self) -> list[str]:
        return list(self.strong_models)

    @property
    def empty(self) -> bool:
        return all(value is None for s in self.series for value in s.values)

    def series_named(self, label: str) -> Series:
        return next(s for s in self.series if s.label == label)


def sweep_figure_data(
    grid: Mapping[str, Any], table: Sequence[Mapping[str, Any]], *, name: str = ""
) -> SweepFigureData:
    """The sweep figure's data from a sweep's ``grid`` and ``table`` (GET /v1/sweeps/{id}); ``name``
    is the sweep's, for the title. Rows are dicts, as in the API's JSON: pass
    ``service.sweeps.SweepRow`` through ``dataclasses.asdict``. See the module docstring for what
    each series holds."""
    rows = [
        {
            **r,  # entries are told apart by label: one model may be listed with several options
            "weak_model": r.get("weak_label") or short_model(r["weak_model"]),
            "strong_model": r.get("strong_label") or short_model(r["strong_model"]),
        }
        for r in table
    ]
    strong = _ordered(model_labels(grid.get("strong_models", [])), (r["strong_model"] for r in rows))
    weak = _ordered(model_labels(grid.get("weak_models", [])), (r["weak_model"] for r in rows))
    losses = _ordered(*[list(r.get("students") or {}) for r in rows])
    others = [loss for loss in losses if loss != SOLID_LOSS]
    dashes = {loss: LOSS_DASHES[i % len(LOSS_DASHES)] for i, loss in enumerate(others)}

    def pair(weak_model: str, strong_model: str) -> list[Mapping[str, Any]]:
        return [r for r in rows if r["weak_model"] == weak_model and r["strong_model"] == strong_model]

    def student(row: Mapping[str, Any], loss: str) -> Any:
        figures = (row.get("students") or {}).get(loss)
        return figures.get("accuracy") if isinstance(figures, Mapping) else None

    students: list[Series] = []
    floors: list[Series] = []
    for w, weak_model in enumerate(weak):
        color, label = PALETTE[w % len(PALETTE)], weak_model
        for loss in losses:
            values = tuple(_mean(student(r, loss) for r in pair(weak_model, s)) for s in strong)
            students.append(
                Series(
                    label=f"{label} → student ({loss})",
                    role="student",
                    values=values,
                    color=color,
                    dash=dashes.get(loss, SOLID),
                    weak_model=weak_model,
                    loss=loss,
                )
            )
        values = tuple(_mean(r.get("weak_accuracy") for r in pair(weak_model, s)) for s in strong)
        floors.append(
            Series(
                label=f"{label} (weak supervisor)",
                role="weak",
                values=values,
                color=color,
                dash=WEAK_DASH,
                weak_model=weak_model,
            )
        )
    ceiling = tuple(_mean(r.get("ceiling_accuracy") for r in rows if r["strong_model"] == s) for s in strong)
    title = f"weak-to-strong on {dataset_label(grid)}"
    return SweepFigureData(
        title=f"{title} ({name})" if name else title,
        strong_models=tuple(strong),
        series=(*students, *floors, Series("strong ceiling", "ceiling", ceiling, CEILING_COLOR)),
    )


def _linestyle(dash: tuple[float, ...]) -> Any:
    return (0, dash) if dash else "-"


def _nan(values: Iterable[float | None]) -> list[float]:
    # matplotlib leaves a gap at NaN: a missing value is never drawn as a point.
    return [float("nan") if value is None else value for value in values]


def _empty_note(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="#6b7280", wrap=True)


def _sweep_figure(data: SweepFigureData) -> Figure:
    from matplotlib.figure import Figure

    width = max(6.0, 1.6 * len(data.strong_models) + 2) + 3.5  # the legend sits right of the axes
    figure = Figure(figsize=(width, 4.8), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    x = list(range(len(data.strong_models)))
    for s in data.series:
        axes.plot(
            x,
            _nan(s.values),
            color=s.color,
            linestyle=_linestyle(s.dash),
            linewidth={"ceiling": 2.2, "weak": 1.3}.get(s.role, 1.6),
            marker={"ceiling": "s", "weak": "."}.get(s.role, "o"),
            markersize=4.5 if s.role == "ceiling" else 4,
            label=s.label,
            zorder=3 if s.role == "ceiling" else 2,
        )
    axes.set_xticks(x, data.x_labels, rotation=15 if len(x) > 3 else 0)
    axes.set_xlim(-0.3, max(len(x) - 1, 0) + 0.3)
    axes.set_ylim(*_padded_range((v for s in data.series for v in s.values if v is not None), 0.0, 1.0))
    axes.set_xlabel("strong model")
    axes.set_ylabel("test accuracy")
    axes.set_title(data.title)
    if data.empty:
        _empty_note(axes, "No results yet: the plot fills in as the sweep's jobs succeed.")
    if data.series:
        # Outside the axes: inside, it hides the curves near the ceiling.
        figure.legend(loc="outside right upper")
    return figure


@contextmanager
def _drawing() -> Iterator[None]:
    import matplotlib

    with _DRAWING, matplotlib.rc_context(STYLE):
        yield


def _save(figure: Figure, fmt: str, dpi: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # no pyplot: the canvas is this figure's own, no global backend
    buffer = io.BytesIO()
    # No creation date in the file: the same figure is the same bytes.
    metadata = {"Date": None} if fmt in ("svg", "pdf") else {}
    figure.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def supported_formats() -> set[str]:
    """What ``render_sweep`` can write (svg, png, pdf, ...), by file extension."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def sweep_figure(data: SweepFigureData) -> Figure:
    """The sweep figure as a matplotlib Figure (to inspect or save yourself)."""
    with _drawing():
        return _sweep_figure(data)


def render_sweep(data: SweepFigureData, fmt: str = "svg", dpi: int = DPI) -> bytes:
    with _drawing():
        return _save(_sweep_figure(data), fmt, dpi)


def render_sweep_svg(data: SweepFigureData) -> str:
    return render_sweep(data, "svg").decode()


def render_sweep_png(data: SweepFigureData, dpi: int = 150) -> bytes:
    return render_sweep(data, "png", dpi)


# ---------------------------------------------------------------------------------------------
# A job's training curves
#
# Drawn as TensorBoard and W&B readers expect: one panel per stage kind (weak, ceiling, one per
# student loss), so no panel holds more lines than the job has seeds; each seed one colour, the same
# in every panel; the raw points faint under their exponential moving average (the smoothing a
# reader sets); evaluations as marked points, never smoothed (each is a full pass over held-out rows).

ROLE_ORDER = {"weak": 0, "ceiling": 1}  # then the students, per seed: the order stages run in
ACCURACY_METRICS = ("train_accuracy", "eval_accuracy")
Panel = Literal["loss", "accuracy"]
DEFAULT_SMOOTHING = 0.8  # batch accuracy is noisy: TensorBoard's 0.6 leaves the trend hard to see
RAW_ALPHA = 0.25


def stage_label(kind: str, seed: int) -> str:
    return f"{kind_label(kind)} · seed {seed}"


def kind_label(kind: str) -> str:
    """A stage kind as a reader says it: "weak", "ceiling", "xent student"."""
    return f"{kind.removeprefix('student:')} student" if kind.startswith("student:") else kind


def ema(values: Sequence[float], weight: float) -> tuple[float, ...]:
    """TensorBoard's smoothing: an exponential moving average with weight ``weight`` (0: none),
    debiased so that the first points are not pulled towards zero. NaNs pass through unsmoothed."""
    if weight <= 0:
        return tuple(values)
    smoothed: list[float] = []
    last, count = 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        smoothed.append(last / (1 - weight**count))
    return tuple(smoothed)


@dataclass(frozen=True)
class Curve:
    kind: str  # the stage's kind ("weak", "ceiling", "student:xent"): its panel
    seed: int  # its colour
    metric: str  # loss | train_accuracy | eval_accuracy
    steps: tuple[int, ...]
    values: tuple[float, ...]
    reused: bool = False  # the stage's result (and these points) came from an earlier job

    @property
    def stage(self) -> str:
        return stage_label(self.kind, self.seed) + (" (reused)" if self.reused else "")

    @property
    def color(self) -> str:
        return PALETTE[self.seed % len(PALETTE)]


@dataclass(frozen=True)
class CurvesFigureData:
    loss: tuple[Curve, ...]
    accuracy: tuple[Curve, ...]  # per stage: training batches, then evaluations
    kinds: tuple[str, ...] = ()  # every stage kind that has points, in run order: the panels

    def panel(self, name: Panel) -> tuple[Curve, ...]:
        return self.loss if name == "loss" else self.accuracy


def _field(series: Any, name: str) -> Any:
    return series[name] if isinstance(series, Mapping) else getattr(series, name)


def curves_figure_data(series: Iterable[Any], order: Sequence[str] = ()) -> CurvesFigureData:
    """A job's curves from its metric series (GET /v1/jobs/{id}/metrics: stage_id, kind, seed, name,
    steps, values; dicts or objects with those attributes). ``order`` is the job's stage ids in run
    order: the panels follow it. Without it, stages go per seed: weak, ceiling, then the students by
    loss name."""
    series = list(series)  # read twice
    stages: dict[str, tuple[str, int]] = {}
    for s in series:
        stages.setdefault(_field(s, "stage_id"), (_field(s, "kind"), int(_field(s, "seed"))))
    known = list(order)
    rest = sorted(
        (stage_id for stage_id in stages if stage_id not in known),
        key=lambda stage_id: (
            stages[stage_id][1],
            ROLE_ORDER.get(stages[stage_id][0], 2),
            stages[stage_id][0],
        ),
    )
    position = {stage_id: i for i, stage_id in enumerate([*known, *rest])}

    def curve(s: Any) -> Curve:
        kind, seed = stages[_field(s, "stage_id")]
        points = sorted(zip(_field(s, "steps"), _field(s, "values"), strict=True))
        reused = bool(s.get("reused") if isinstance(s, Mapping) else getattr(s, "reused", False))
        return Curve(
            kind=kind,
            seed=seed,
            metric=_field(s, "name"),
            steps=tuple(int(step) for step, _ in points),
            values=tuple(float(value) for _, value in points),
            reused=reused,
        )

    drawn = [s for s in series if _field(s, "name") == "loss" or _field(s, "name") in ACCURACY_METRICS]
    drawn.sort(key=lambda s: (position[_field(s, "stage_id")], _metric_rank(_field(s, "name"))))
    curves = [curve(s) for s in drawn]
    kinds = tuple(dict.fromkeys(c.kind for c in curves))
    return CurvesFigureData(
        loss=tuple(c for c in curves if c.metric == "loss"),
        accuracy=tuple(c for c in curves if c.metric in ACCURACY_METRICS),
        kinds=kinds,
    )


def _metric_rank(name: str) -> int:
    return ACCURACY_METRICS.index(name) if name in ACCURACY_METRICS else -1


def _grid(count: int) -> tuple[int, int]:
    """(rows, columns) for ``count`` panels: up to three side by side, four past nine."""
    columns = 1 if count <= 1 else min(count, 3 if count <= 9 else 4)
    return -(-count // columns), columns


def _padded_range(
    values: Iterable[float], floor: float | None = None, ceiling: float | None = None
) -> tuple[float, float]:
    """The y range of ``values``, padded a little and kept within [floor, ceiling]: a figure shows
    its data (0.78 to 0.86 fills the axes) instead of a thin band of the metric's possible range."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (0.0 if floor is None else floor), (1.0 if ceiling is None else ceiling)
    low, high = min(finite), max(finite)
    pad = max(0.1 * (high - low), 0.01 * max(abs(high), 1.0))
    low, high = low - pad, high + pad
    return (low if floor is None else max(low, floor)), (high if ceiling is None else min(high, ceiling))


def _curves_figure(data: CurvesFigureData, panel: Panel, smoothing: float, kind: str | None) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    curves = [c for c in data.panel(panel) if kind is None or c.kind == kind]
    kinds = [k for k in data.kinds if kind is None or k == kind] or ([kind] if kind else [])
    metric_name = "loss" if panel == "loss" else "accuracy"
    if not curves:
        figure = Figure(figsize=(6.4, 3.2), dpi=DPI, layout="constrained")
        axes = figure.add_subplot()
        axes.set_xticks([])  # no steps yet: a 0..1 step axis would mean nothing
        axes.set_xlabel("training step")
        axes.set_ylabel(metric_name)
        _empty_note(axes, "Waiting for the first training steps…")
        return figure
    rows, columns = _grid(len(kinds))
    size = (7.2, 4.0) if len(kinds) == 1 else (3.3 * columns, 2.4 * rows + 0.8)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    # One y scale for every panel, so that panels compare at a glance; steps differ between stages.
    grid = figure.subplots(rows, columns, sharey=True, squeeze=False)
    values = (v for c in curves for v in c.values)
    low, high = _padded_range(values, *((None, None) if panel == "loss" else (0.0, 1.0)))
    for index, axes in enumerate(grid.flat):
        if index >= len(kinds):
            axes.set_visible(False)
            continue
        here = [c for c in curves if c.kind == kinds[index]]
        reused = bool(here) and all(c.reused for c in here)
        axes.set_title(kind_label(kinds[index]) + (" (reused)" if reused else ""), fontsize=10)
        for c in here:
            if c.metric == "eval_accuracy":
                # A marker per evaluation; a thin line only guides the eye between them.
                axes.plot(
                    c.steps,
                    c.values,
                    color=c.color,
                    linestyle=(0, EVAL_DASH),
                    linewidth=0.9,
                    marker="o",
                    markersize=3.5,
                    zorder=3,
                )
                continue
            single = len(c.steps) == 1  # a single point has no line to show it
            if smoothing > 0 and not single:
                axes.plot(c.steps, c.values, color=c.color, linewidth=0.9, alpha=RAW_ALPHA)
            axes.plot(
                c.steps,
                ema(c.values, smoothing),
                color=c.color,
                linewidth=1.6,
                marker="o" if single else None,
                markersize=3,
            )
        axes.set_ylim(low, high)
        if index % columns == 0:
            axes.set_ylabel(metric_name)
        if index >= len(kinds) - columns:  # the bottom panel of its column
            axes.set_xlabel("training step")
    title = "Training loss" if panel == "loss" else "Accuracy: training batches and evaluations"
    figure.suptitle(title, fontsize=11)
    # The legend says what colours and line styles mean, once for every panel.
    seeds = sorted({c.seed for c in curves})
    handles = (
        [
            Line2D([], [], color=PALETTE[seed % len(PALETTE)], linewidth=1.8, label=f"seed {seed}")
            for seed in seeds
        ]
        if len(seeds) > 1
        else []
    )
    style = "#555555"
    if smoothing > 0:
        handles += [
            Line2D([], [], color=style, linewidth=1.6, label=f"smoothed (EMA {smoothing:.2f})"),
            Line2D([], [], color=style, linewidth=0.9, alpha=RAW_ALPHA * 2, label="raw"),
        ]
    else:
        handles.append(Line2D([], [], color=style, linewidth=1.6, label="raw (no smoothing)"))
    if panel == "accuracy":
        handles.append(
            Line2D(
                [],
                [],
                color=style,
                linestyle=(0, EVAL_DASH),
                linewidth=0.9,
                marker="o",
                markersize=3.5,
                label="evaluation",
            )
        )
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return figure


def curves_figure(
    data: CurvesFigureData, panel: Panel, smoothing: float = DEFAULT_SMOOTHING, kind: str | None = None
) -> Figure:
    with _drawing():
        return _curves_figure(data, panel, smoothing, kind)


def render_curves(
    data: CurvesFigureData,
    panel: Panel,
    fmt: str = "svg",
    dpi: int = DPI,
    smoothing: float = DEFAULT_SMOOTHING,
    kind: str | None = None,
) -> bytes:
    with _drawing():
        return _save(_curves_figure(data, panel, smoothing, kind), fmt, dpi)


def render_curves_svg(
    data: CurvesFigureData, panel: Panel, smoothing: float = DEFAULT_SMOOTHING, kind: str | None = None
) -> str:
    """One panel of a job's curves: ``loss``, or ``accuracy`` (training batches and evaluations),
    one small plot per stage kind (only ``kind``'s, if given), smoothed with EMA weight ``smoothing``."""
    return render_curves(data, panel, "svg", smoothing=smoothing, kind=kind).decode()
