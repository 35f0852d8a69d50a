"""What the dashboard shows, computed from the API's public schemas: table rows, the stage timeline,
the results table, the curl command and the sweep's CSV (w2s.plots draws the figures). No database
access and no HTTP here, so every figure on a page is the figure the /v1 API returns."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from api.schemas import (
    JobPublic,
    JobSummary,
    StagePublic,
    SweepPublic,
    job_progress,
    job_summary,
    run_seconds,
)
from service.display import ago, duration, short_model, short_names
from service.states import (
    JOB_TERMINAL,
    JobStatus,
    StageEventKind,
    StageStatus,
    can_cancel,
    can_retry,
    has_result,
)
from w2s.plots import PALETTE
from w2s.results import FLAG_DESCRIPTIONS

JOB_STATUSES = [str(status) for status in JobStatus]


def utc(moment: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------------------------
# Formatting (also registered as Jinja filters; durations and model names are service.display's,
# shared with the w2s client)


def iso(moment: dt.datetime | None) -> str:
    moment = utc(moment)
    return moment.isoformat() if moment is not None else ""


def timestamp(moment: dt.datetime | None) -> str:
    moment = utc(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "—"


def number(value: Any, digits: int = 3) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "—"
    return f"{value:.{digits}f}"


def interval(value: Any, digits: int = 3) -> str:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return ""
    low, high = value
    if not all(isinstance(v, int | float) for v in (low, high)):
        return ""
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def elapsed(start: dt.datetime | None, end: dt.datetime | None) -> str:
    """A job's run time (api.schemas.run_seconds), as every page writes it."""
    return duration(run_seconds(start, end))


SPEC_ORDER = ["name", "priority", "dataset", "weak", "strong", "transfer", "losses", "seeds"]


def spec_ordered(spec: dict[str, Any]) -> dict[str, Any]:
    """Top-level spec fields in the README's order (Postgres' JSONB hands them back sorted by length)."""
    known = {key: spec[key] for key in SPEC_ORDER if key in spec}
    return known | {key: value for key, value in spec.items() if key not in known}


def pretty_json(value: Any) -> str:
    if isinstance(value, dict):
        value = spec_ordered(value)
    return json.dumps(value, indent=2, ensure_ascii=False)


def gpu_hours(seconds: float | None) -> str:
    hours = (seconds or 0.0) / 3600
    return f"{hours:.2f}" if hours < 100 else f"{hours:,.0f}"


def filesize(size: int | None) -> str:
    """Bytes as people read them: 0 B, 512 KiB, 3.4 GiB."""
    value = float(size or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def stage_label(kind: str) -> str:
    return kind.removeprefix("student:") if kind.startswith("student:") else kind


# ---------------------------------------------------------------------------------------------
# Jobs list


class JobRow(JobSummary):
    """A jobs-table row: the API's job summary (its run time, duration_s, included) plus what the
    table draws."""

    losses: list[str] = Field(description="student losses, in spec order")
    live_progress: float = Field(description="progress with the running stages' step fractions")
    current_stage: str | None = Field(description="the running stage, e.g. 'ceiling · seed 0 · 40%'")
    stages_done: int
    stages_total: int


def _losses(stages: list[Any]) -> list[str]:
    labels: list[str] = []
    for stage in stages:
        label = stage.kind.removeprefix("student:")
        if stage.kind.startswith("student:") and label not in labels:
            labels.append(label)
    return labels


def _stage_fraction(stage: Any) -> float:
    if has_result(stage.status):
        return 1.0
    if stage.status == StageStatus.running and stage.total_steps:
        return min(1.0, stage.step / stage.total_steps)
    return 0.0


def job_row(job: Any, reference: dt.datetime | None = None) -> JobRow:
    summary = job_summary(job, reference)
    stages = list(job.stages)
    running = [stage for stage in stages if stage.status == StageStatus.running]
    current = None
    if running:
        stage = running[0]
        current = f"{stage_label(stage.kind)} · seed {stage.seed}"
        if stage.total_steps:
            current += f" · {_stage_fraction(stage):.0%}"
    return JobRow(
        **summary.model_dump(),
        losses=_losses(stages),
        live_progress=job_progress(sum(_stage_fraction(s) for s in stages), len(stages), job.status),
        current_stage=current,
        stages_done=sum(has_result(s.status) for s in stages),
        stages_total=len(stages),
    )


# ---------------------------------------------------------------------------------------------
# One job


@dataclass
class StageView:
    stage: StagePublic
    label: str
    color: str
    fraction: float
    # The stage's bars on the job's time axis, as percentages of its width (SVG attributes).
    wait_bar: tuple[float, float] | None = None
    run_bar: tuple[float, float] | None = None
    # Checkpoints, preemptions, drains and resumes: (position %, css class, what happened).
    marks: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def history(self) -> str:
        """One line: how often it was preempted, where it resumed, its last checkpoint."""
        stage, parts = self.stage, []
        if stage.preemptions:
            parts.append(f"preempted {stage.preemptions}×")
        resumed = [e.step for e in stage.events if e.kind == StageEventKind.resumed]
        if resumed:
            parts.append("resumed from step " + ", ".join(str(step) for step in resumed))
        if stage.checkpoint_step:
            parts.append(f"last checkpoint at step {stage.checkpoint_step}")
        if stage.yield_requested_at is not None and stage.status == StageStatus.running:
            parts.append("asked to checkpoint and yield")
        return " · ".join(parts)


# How each timeline event is drawn (a class of the .gantt-mark rules in the stylesheet).
MARK_CLASSES = {
    StageEventKind.checkpoint: "mark-checkpoint",
    StageEventKind.preempt_asked: "mark-asked",
    StageEventKind.drain_asked: "mark-asked",
    StageEventKind.yielded: "mark-yielded",
    StageEventKind.forced: "mark-yielded",
    StageEventKind.resumed: "mark-resumed",
}


@dataclass
class SeedGroup:
    seed: int
    stages: list[StageView] = field(default_factory=list)


def stage_colors(job: JobPublic) -> dict[str, str]:
    return {stage.id: PALETTE[i % len(PALETTE)] for i, stage in enumerate(job.stages)}


def timeline(job: JobPublic, reference: dt.datetime | None = None) -> tuple[list[SeedGroup], str]:
    """Stages grouped by seed in run order (weak, ceiling, a student per loss), each placed on
    the job's time axis; and the axis' span as text."""
    reference = reference or now()
    colors = stage_colors(job)
    moments = [utc(m) for s in job.stages for m in (s.queued_at, s.started_at, s.finished_at) if m]
    moments += [utc(e.at) for s in job.stages for e in s.events]
    start = min(moments) if moments else None
    end = max([*moments, reference] if job.status not in JOB_TERMINAL else moments) if moments else None
    span = (end - start).total_seconds() if start and end else 0.0

    def position(moment: dt.datetime | None) -> float:
        moment = utc(moment)
        if moment is None or start is None or span <= 0:
            return 0.0
        return max(0.0, min(100.0, (moment - start).total_seconds() / span * 100))

    groups: dict[int, SeedGroup] = {}
    for stage in job.stages:
        view = StageView(stage, stage_label(stage.kind), colors[stage.id], _stage_fraction(stage))
        if start is not None and span > 0:
            run_end = stage.finished_at or (reference if stage.status == StageStatus.running else None)
            if stage.queued_at and stage.started_at:
                left = position(stage.queued_at)
                view.wait_bar = (left, max(0.4, position(stage.started_at) - left))
            elif stage.queued_at and stage.status == StageStatus.queued:
                left = position(stage.queued_at)
                view.wait_bar = (left, max(0.4, position(reference) - left))
            if stage.started_at and run_end:
                left = position(stage.started_at)
                view.run_bar = (left, max(0.6, position(run_end) - left))
            elif stage.status == StageStatus.cached and stage.finished_at:
                view.run_bar = (position(stage.finished_at), 0.6)
            view.marks = [
                (position(e.at), MARK_CLASSES.get(StageEventKind(e.kind), "mark-checkpoint"), _event_text(e))
                for e in stage.events
            ]
        groups.setdefault(stage.seed, SeedGroup(stage.seed)).stages.append(view)
    return list(groups.values()), duration(span) if span else ""


def _event_text(event: Any) -> str:
    step = f" at step {event.step}" if event.step is not None else ""
    return f"{event.kind.replace('_', ' ')}{step}" + (f": {event.detail}" if event.detail else "")


@dataclass
class ResultRow:
    role: str  # weak | ceiling | student
    label: str
    figures: dict[str, Any]


def results_rows(results: dict[str, Any] | None) -> list[ResultRow]:
    if not results:
        return []
    rows = []
    for role in ("weak", "ceiling"):
        if isinstance(results.get(role), dict):
            rows.append(
                ResultRow(role, "weak supervisor" if role == "weak" else "strong ceiling", results[role])
            )
    students = results.get("students")
    for loss, figures in (students if isinstance(students, dict) else {}).items():
        if isinstance(figures, dict):
            rows.append(ResultRow("student", f"student · {loss}", figures))
    return rows


@dataclass
class ChainRow:
    label: str
    supervisor: dict[str, Any] | None  # hops only: the model that gave the labels
    student: dict[str, Any]
    ceiling: dict[str, Any] | None  # hops only: the student model trained on ground truth


@dataclass
class ChainTable:
    loss: str
    hops: list[ChainRow]
    ends: list[ChainRow]


def chain_tables(results: dict[str, Any] | None) -> list[ChainTable]:
    """The bootstrapping chain of a job's results, per loss: each hop, then the chain's end next to
    the direct weak -> strong student (both against the strong ceiling)."""
    chain = (results or {}).get("chain")
    if not isinstance(chain, dict):
        return []
    models = [short_model(str(name)) for name in chain.get("models") or []]
    tables = []
    for loss, block in (chain.get("losses") or {}).items():
        hops = [
            ChainRow(
                f"{short_model(str(hop.get('supervisor')))} → {short_model(str(hop.get('student')))}",
                hop.get("supervisor_figures") or {},
                hop.get("student_figures") or {},
                hop.get("ceiling_figures") or {},
            )
            for hop in block.get("hops") or []
        ]
        ends = block.get("end_to_end") or {}
        direct = f"direct: {models[0]} → {models[-1]}" if models else "direct"
        tables.append(
            ChainTable(
                loss,
                hops,
                [
                    ChainRow("chain: " + " → ".join(models), None, ends.get("chain") or {}, None),
                    ChainRow(direct, None, ends.get("direct") or {}, None),
                ],
            )
        )
    return tables


def flags(results: dict[str, Any] | None) -> list[tuple[str, str]]:
    names = (results or {}).get("flags") or []
    return [(name, FLAG_DESCRIPTIONS.get(name, "")) for name in names if isinstance(name, str)]


def curl_command(job: JobPublic, base_url: str) -> str:
    """The job's submission as a shell command. The key comes from $W2S_API_KEY, in double quotes
    so the shell expands it; the body in single quotes so nothing in it is."""
    body: dict[str, Any] = {}
    if job.name:
        body["name"] = job.name
    if job.priority:
        body["priority"] = job.priority
    body = spec_ordered(body | job.spec)
    payload = shlex.quote(json.dumps(body, separators=(",", ":")))
    url = base_url.rstrip("/") + "/v1/jobs"
    return (
        f'curl -X POST {url} -H "Authorization: Bearer $W2S_API_KEY" '
        f"-H 'Content-Type: application/json' -d {payload}"
    )


def example_curl(base_url: str) -> str:
    """The empty jobs page's example: the README's probe job, laid out to read at a glance."""
    return (
        f"curl -X POST {base_url.rstrip('/')}/v1/jobs \\\n"
        "  -H \"Authorization: Bearer $W2S_API_KEY\" -H 'Content-Type: application/json' \\\n"
        """  -d '{"name": "minilm-to-mpnet-sst2", "dataset": {"name": "sst2", "n_train": 4000},
       "weak": {"model": "./models/all-MiniLM-L6-v2", "mode": "probe"},
       "strong": {"model": "./models/all-mpnet-base-v2", "mode": "probe"},
       "losses": ["xent", "logconf"], "seeds": [0]}"""
        "'"
    )


def job_actions(job: JobPublic) -> dict[str, bool]:
    """Which buttons the job page shows: the transitions service.states allows from its status."""
    return {"cancel": can_cancel(job.status), "retry": can_retry(job.status)}


# ---------------------------------------------------------------------------------------------
# Sweeps


def sweep_losses(sweep: SweepPublic) -> list[str]:
    labels: list[str] = []
    for row in sweep.table:
        labels += [loss for loss in row.students if loss not in labels]
    return labels


def sweep_csv(sweep: SweepPublic) -> str:
    """One row per job: the sweep table as a spreadsheet reads it."""
    losses = sweep_losses(sweep)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = [
        "job_id",
        "weak_model",
        "strong_model",
        "weak_label",
        "strong_label",
        "status",
        "weak_accuracy",
        "ceiling_accuracy",
    ]
    for loss in losses:
        header += [f"{loss} accuracy", f"{loss} pgr"]
    writer.writerow(header)

    def cell(value: float | None) -> str:
        return "" if value is None else repr(float(value))

    for row in sweep.table:
        line = [
            row.job_id,
            row.weak_model,
            row.strong_model,
            row.weak_label,
            row.strong_label,
            row.status,
            cell(row.weak_accuracy),
            cell(row.ceiling_accuracy),
        ]
        for loss in losses:
            figures = row.students.get(loss, {})
            line += [cell(figures.get("accuracy")), cell(figures.get("pgr"))]
        writer.writerow(line)
    return out.getvalue()


FILTERS = {
    "short_model": short_model,
    "short_names": short_names,
    "duration": duration,
    "ago": ago,
    "iso": iso,
    "timestamp": timestamp,
    "number": number,
    "interval": interval,
    "gpu_hours": gpu_hours,
    "filesize": filesize,
    "pretty_json": pretty_json,
    "stage_label": stage_label,
}
