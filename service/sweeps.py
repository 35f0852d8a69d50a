"""Sweeps: a grid of weak x strong models on one dataset, one job per pair, and the sweep's table.

Jobs of a sweep share stages: the weak stage of a weak model is the same for every strong model,
and the ceiling of a strong model the same for every weak model. Nothing here deduplicates them:
equal stages have equal stage keys, and the dispatcher runs one key once and completes the others
from the stored result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import limits
from service.jobs import (
    NotFound,
    ResolvedSpec,
    check_size_first,
    create_job,
    expand_stages,
    resolve_spec,
)
from service.models import Job, Sweep, Team, new_id
from service.pagination import newest_first, page
from service.settings import Settings
from service.states import JOB_TERMINAL, JobStatus
from service.storage import check_storage
from w2s.plots import model_labels, short_model
from w2s.spec import LossSpec, SpecError

ROLES = {"weak": "weak_models", "strong": "strong_models"}


@dataclass
class SweepRow:
    job_id: str
    weak_model: str
    strong_model: str
    # The grid entry's label: the model's short name, plus the options that set it apart from
    # other entries of the same model (w2s.plots.model_labels).
    weak_label: str
    strong_label: str
    status: str
    weak_accuracy: float | None
    ceiling_accuracy: float | None
    students: dict[str, dict[str, float | None]]


@dataclass
class SweepReport:
    id: str
    name: str
    created_at: Any
    status: str
    grid: dict[str, Any]
    jobs: list[str]
    table: list[SweepRow]
    pgr_summary: dict[str, dict[str, float | None]]


def _model(entry: dict[str, Any] | str) -> dict[str, Any]:
    return {"model": entry} if isinstance(entry, str) else dict(entry)


def _relocate(loc: str, weak_index: int, strong_index: int) -> str:
    """'weak.mode' of pair (i, j) -> 'weak_models.i.mode': the field as the sweep body names it."""
    head, _, rest = loc.partition(".")
    if head in ROLES:
        index = weak_index if head == "weak" else strong_index
        return ".".join(part for part in (ROLES[head], str(index), rest) if part)
    return loc


def create_sweep(
    session: Session,
    *,
    team: Team,
    settings: Settings,
    grid: dict[str, Any],
    name: str = "",
    priority: int = 0,
) -> Sweep:
    """Create the sweep and one queued job per (weak, strong) pair, in the caller's transaction.

    ``grid`` holds dataset, weak_models, strong_models, transfer, losses and seeds. Every pair is
    validated before anything is added; an invalid one raises :class:`SpecError` whose fields are
    named as in the grid (``strong_models.1.mode``), each problem once.
    """
    pairs = len(grid["weak_models"]) * len(grid["strong_models"])
    check_size_first(team, settings, grid, pairs=pairs, what="sweep")
    specs: list[tuple[tuple[int, int], ResolvedSpec]] = []
    errors: dict[tuple[str, str], None] = {}  # ordered set: a bad weak model fails every pair
    for i, weak in enumerate(grid["weak_models"]):
        for j, strong in enumerate(grid["strong_models"]):
            raw = {
                "dataset": grid["dataset"],
                "weak": _model(weak),
                "strong": _model(strong),
                "transfer": grid.get("transfer") or {},
                "losses": grid["losses"],
                "seeds": grid["seeds"],
            }
            try:
                specs.append(((i, j), resolve_spec(session, team=team, raw=raw, settings=settings)))
            except SpecError as error:
                errors.update({(_relocate(loc, i, j), msg): None for loc, msg in error.errors})
    if errors:
        raise SpecError(list(errors))
    n_stages = sum(len(expand_stages(resolved.spec)) for _, resolved in specs)
    limits.check_priority(team, settings, priority)
    limits.check_job_size(team, settings, n_stages, what="sweep")
    limits.check_backlog(session, team, settings, n_stages)
    check_storage(session, team, settings, what="a new sweep")
    sweep = Sweep(id=new_id(), team_id=team.id, name=name, grid=grid)
    session.add(sweep)
    session.flush()  # the jobs' foreign key needs the row
    label = name or f"sweep-{sweep.id[:8]}"
    weak_labels, strong_labels = model_labels(grid["weak_models"]), model_labels(grid["strong_models"])
    for (i, j), resolved in specs:
        create_job(
            session,
            team=team,
            resolved=resolved,
            settings=settings,
            name=f"{label}: {weak_labels[i]} -> {strong_labels[j]}"[:200],
            priority=priority,
            sweep_id=sweep.id,
            sweep_position=(i, j),
            check_backlog=False,  # checked once for the whole sweep above
        )
    return sweep


def get_sweep(session: Session, *, team_id: str, sweep_id: str) -> Sweep:
    sweep = session.scalar(select(Sweep).where(Sweep.id == sweep_id, Sweep.team_id == team_id))
    if sweep is None:
        raise NotFound(f"sweep {sweep_id} not found")
    return sweep


def sweep_status(statuses: list[str]) -> str:
    """failed if any job failed; succeeded if all did; cancelled if all ended otherwise; queued
    while none has started; else running."""
    if all(s == JobStatus.queued for s in statuses):
        return JobStatus.queued.value
    if JobStatus.failed in statuses:
        return JobStatus.failed.value
    if all(s == JobStatus.succeeded for s in statuses):
        return JobStatus.succeeded.value
    if all(s in JOB_TERMINAL for s in statuses):
        return JobStatus.cancelled.value
    return JobStatus.running.value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _figure(section: Any, name: str) -> float | None:
    return _number(section.get(name)) if isinstance(section, dict) else None


def _loss_labels(grid: dict[str, Any], jobs: list[Job]) -> list[str]:
    labels = [LossSpec.model_validate(loss).label for loss in grid.get("losses", [])]
    for job in jobs:  # results may name a loss the grid does not (defensive; normally none)
        students = (job.results or {}).get("students")
        labels += [label for label in students or {} if label not in labels]
    return labels


def sweep_report(session: Session, *, sweep: Sweep) -> SweepReport:
    """The sweep's table (one row per job, figures from each job's results) and PGR per loss."""
    jobs = list(session.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.created_at, Job.id)))
    losses = _loss_labels(sweep.grid, jobs)
    weak_labels = model_labels(sweep.grid.get("weak_models", []))
    strong_labels = model_labels(sweep.grid.get("strong_models", []))

    def label(labels: list[str], index: int | None, model: str) -> str:
        # Jobs made before positions were recorded are labelled by their model.
        return labels[index] if index is not None and 0 <= index < len(labels) else short_model(model)

    table: list[SweepRow] = []
    pgrs: dict[str, list[float]] = {loss: [] for loss in losses}
    for job in jobs:
        results = job.results or {}
        students = results.get("students") if isinstance(results.get("students"), dict) else {}
        row = SweepRow(
            job_id=job.id,
            weak_model=job.weak_model,
            strong_model=job.strong_model,
            weak_label=label(weak_labels, job.sweep_weak_index, job.weak_model),
            strong_label=label(strong_labels, job.sweep_strong_index, job.strong_model),
            status=job.status,
            weak_accuracy=_figure(results.get("weak"), "accuracy"),
            ceiling_accuracy=_figure(results.get("ceiling"), "accuracy"),
            students={
                loss: {
                    "accuracy": _figure(students.get(loss), "accuracy"),
                    "pgr": _figure(students.get(loss), "pgr"),
                }
                for loss in losses
            },
        )
        table.append(row)
        if job.status == JobStatus.succeeded:
            for loss, figures in row.students.items():
                if figures["pgr"] is not None:  # None: the ceiling was not above the weak model
                    pgrs[loss].append(figures["pgr"])
    summary = {
        loss: {
            "mean": sum(values) / len(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
        }
        for loss, values in pgrs.items()
    }
    return SweepReport(
        id=sweep.id,
        name=sweep.name,
        created_at=sweep.created_at,
        status=sweep_status([job.status for job in jobs]),
        grid=sweep.grid,
        jobs=[job.id for job in jobs],
        table=table,
        pgr_summary=summary,
    )


@dataclass
class SweepListing:
    id: str
    name: str
    created_at: Any
    status: str
    n_jobs: int


def list_sweeps(
    session: Session, *, team_id: str, limit: int = 50, cursor: str | None = None
) -> tuple[list[SweepListing], str | None]:
    """The team's sweeps, newest first, keyset-paginated, each with its status and job count."""
    query = newest_first(select(Sweep).where(Sweep.team_id == team_id), Sweep, limit=limit, cursor=cursor)
    sweeps, next_cursor = page(session.scalars(query).all(), limit)
    statuses: dict[str, list[str]] = defaultdict(list)
    counts = select(Job.sweep_id, Job.status, func.count()).where(Job.sweep_id.in_([s.id for s in sweeps]))
    for sweep_id, status, count in session.execute(counts.group_by(Job.sweep_id, Job.status)):
        statuses[sweep_id] += [status] * count
    listings = [
        SweepListing(s.id, s.name, s.created_at, sweep_status(statuses[s.id]), len(statuses[s.id]))
        for s in sweeps
    ]
    return listings, next_cursor
