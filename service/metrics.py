"""A job's training curves: the metric points of its stages (a cached stage shows the points of the
run that computed its result, when that run was the same team's), and their stage states. Read by
``GET /v1/jobs/{id}/metrics`` and by the stream hub (api/streams.py), which reads them once per job
per tick for every viewer of the job."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Job, MetricPoint, MetricSeries, Stage
from service.states import JOB_TERMINAL, StageStatus
from w2s.curves import lttb


@dataclass(frozen=True)
class Point:
    id: int
    stage_id: str  # the job's stage the point is shown under
    kind: str
    seed: int
    name: str
    step: int
    value: float
    reused: bool  # from the run that computed a cached stage's result


@dataclass(frozen=True)
class JobState:
    status: str
    finished: bool
    stages: dict[str, dict[str, Any]]  # stage id -> kind, seed, status, step


def job_state(job: Job) -> JobState:
    stages = {
        stage.id: {"kind": stage.kind, "seed": stage.seed, "status": stage.status, "step": stage.step}
        for stage in job.stages
    }
    return JobState(job.status, job.status in JOB_TERMINAL, stages)


def _origins(session: Session, job: Job) -> dict[str, str]:
    """For the job's cached stages: the id of the same team's stage that computed the result -> the
    cached stage's id."""
    cached = {
        stage.stage_key: stage.id
        for stage in job.stages
        if stage.status == StageStatus.cached and stage.stage_key
    }
    origin_of: dict[str, str] = {}  # the computing stage's id -> the cached stage's id
    if cached:
        origins = session.execute(
            select(Stage.id, Stage.stage_key).where(
                Stage.stage_key.in_(list(cached)),
                Stage.status == StageStatus.succeeded,
                Stage.team_id == job.team_id,
            )
        )
        for origin_id, key in origins:
            if cached[key] not in origin_of.values():
                origin_of[origin_id] = cached[key]
    return origin_of


def job_points(session: Session, job: Job, after_id: int = 0) -> list[Point]:
    """The job's points with an id above ``after_id``, by stage, metric and step."""
    stages = {stage.id: stage for stage in job.stages}
    origin_of = _origins(session, job)
    rows = session.execute(
        select(MetricPoint.id, MetricPoint.stage_id, MetricPoint.name, MetricPoint.step, MetricPoint.value)
        .where(MetricPoint.stage_id.in_([*stages, *origin_of]), MetricPoint.id > after_id)
        .order_by(MetricPoint.stage_id, MetricPoint.name, MetricPoint.step)
    ).all()
    points = []
    for point_id, source_id, name, step, value in rows:
        stage = stages[origin_of.get(source_id, source_id)]
        points.append(
            Point(point_id, stage.id, stage.kind, stage.seed, name, step, value, source_id in origin_of)
        )
    return points


def latest_point_id(session: Session, job: Job, after_id: int = 0) -> int:
    """The newest point id of the job's own stages (the curves' version), or ``after_id``."""
    newest = session.scalar(
        select(func.max(MetricPoint.id)).where(
            MetricPoint.stage_id.in_([stage.id for stage in job.stages]), MetricPoint.id > after_id
        )
    )
    return int(newest) if newest is not None else after_id


def as_series(points: list[Point]) -> list[dict[str, Any]]:
    """Points grouped into one series per stage and metric (the shape of api.schemas.MetricSeries)."""
    series: dict[tuple[str, str], dict[str, Any]] = {}
    for point in points:
        entry = series.setdefault(
            (point.stage_id, point.name),
            {
                "stage_id": point.stage_id,
                "kind": point.kind,
                "seed": point.seed,
                "name": point.name,
                "steps": [],
                "values": [],
                "reused": point.reused,
            },
        )
        entry["steps"].append(point.step)
        entry["values"].append(point.value)
    return list(series.values())


def job_series(session: Session, job: Job, max_points: int) -> list[dict[str, Any]]:
    """The job's curves for reading: each at most ``max_points`` points (thinned further with LTTB
    when stored longer, e.g. before curves were bounded), with the exact ``min``, ``max`` and
    ``last`` of the whole curve and how many steps reported it (``points_seen``)."""
    stages = {stage.id: (stage.kind, stage.seed) for stage in job.stages}
    origin_of = _origins(session, job)
    stage_ids = list(stages)
    # On the session's connection, not through the ORM: plain rows, a third cheaper per point.
    rows = (
        session.connection()
        .execute(
            select(MetricPoint.stage_id, MetricPoint.name, MetricPoint.step, MetricPoint.value)
            .where(MetricPoint.stage_id.in_([*stage_ids, *origin_of]))
            .order_by(MetricPoint.stage_id, MetricPoint.name, MetricPoint.step)
        )
        .all()
    )
    # Grouped straight from the ordered rows: no object per point (a few thousand per curve).
    series = []
    for (source_id, name), group in itertools.groupby(rows, key=lambda row: (row[0], row[1])):
        _, _, steps, values = zip(*group, strict=True)
        shown = origin_of.get(source_id, source_id)
        kind, seed = stages[shown]
        series.append(
            {
                "stage_id": shown,
                "kind": kind,
                "seed": seed,
                "name": name,
                "steps": list(steps),
                "values": list(values),
                "reused": source_id in origin_of,
            }
        )
    summaries = {
        (origin_of.get(row.stage_id, row.stage_id), row.name): row
        for row in session.scalars(
            select(MetricSeries).where(MetricSeries.stage_id.in_([*stage_ids, *origin_of]))
        )
    }
    for entry in series:
        steps, values = entry["steps"], entry["values"]
        summary = summaries.get((entry["stage_id"], entry["name"]))
        if summary is not None:
            entry |= {
                "points_seen": summary.points_seen,
                "min": summary.min_value,
                "max": summary.max_value,
                "last_step": summary.last_step,
                "last": summary.last_value,
            }
        elif values:  # written before curves were bounded: every point is stored
            entry |= {
                "points_seen": len(values),
                "min": min(values),
                "max": max(values),
                "last_step": steps[-1],
                "last": values[-1],
            }
        if len(steps) > max_points:
            kept = lttb(steps, values, max_points)
            entry["steps"] = [steps[i] for i in kept]
            entry["values"] = [values[i] for i in kept]
    return series
