"""What the dashboard shows, computed from the API's public schemas: table rows, the stage timeline,
the results table, the curl command and the sweep's CSV (w2s.plots draws the figures). No database
access and no HTTP here, so every figure on a page is the figure the /v1 API returns."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from pydantic import Field

from api.schemas import JobPublic, JobSummary, StagePublic, SweepPublic, job_summary
from service.states import JOB_TERMINAL, JobStatus, StageStatus, can_cancel, can_retry, has_result
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
# Formatting (also registered as Jinja filters)


def short_model(name: str) -> str:
    """A local model directory by its last part (``/data/models/all-MiniLM-L6-v2`` ->
    ``all-MiniLM-L6-v2``); hub ids (``openai-community/gpt2``) stay as they are."""
    if name.startswith(("/", ".", "~")):
        return PurePosixPath(name.rstrip("/")).name or name
    return name


_PATH_TOKEN = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/(?:[^\s/]+/)*([^\s/]+)/?")


def short_names(text: str) -> str:
    """Model paths inside a text as their last part: sweeps name their jobs
    ``"<sweep>: <weak model> -> <strong model>"``, and full paths make a table unreadable."""
    return _PATH_TOKEN.sub(lambda match: match.group(1), text)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 10:
        return f"{minutes} min {secs:02d} s"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def ago(moment: dt.datetime | None, reference: dt.datetime | None = None) -> str:
    moment = utc(moment)
    if moment is None:
        return "—"
    seconds = ((reference or now()) - moment).total_seconds()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


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
    start, end = utc(start), utc(end)
    return duration((end - start).total_seconds()) if start and end else "—"


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


def stage_label(kind: str) -> str:
    return kind.removeprefix("student:") if kind.startswith("student:") else kind


# ---------------------------------------------------------------------------------------------
# Jobs list


class JobRow(JobSummary):
    """A jobs-table row: the API's job summary plus what the table draws."""

    losses: list[str] = Field(description="student losses, in spec order")
    started_at: dt.datetime | None
    duration_s: float | None = Field(description="started to finished; for a running job, so far")
    live_progress: float = Field(description="stages done plus the running stages' step fraction")
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
    summary = job_summary(job)
    stages = list(job.stages)
    started, finished = utc(job.started_at), utc(job.finished_at)
    if started is not None:
        elapsed: float | None = ((finished or reference or now()) - started).total_seconds()
    else:
        elapsed = None
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
        started_at=started,
        duration_s=elapsed,
        live_progress=sum(_stage_fraction(s) for s in stages) / len(stages) if stages else 0.0,
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
        groups.setdefault(stage.seed, SeedGroup(stage.seed)).stages.append(view)
    return list(groups.values()), duration(span) if span else ""


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
    "pretty_json": pretty_json,
    "stage_label": stage_label,
}
