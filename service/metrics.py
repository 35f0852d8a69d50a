"""A job's training curves: the metric points of its stages (a cached stage shows the points of the
run that computed its result, when that run was the same team's), and their stage states. Read by
``GET /v1/jobs/{id}/metrics`` and by the stream hub (api/streams.py), which reads them once per job
per tick for every viewer of the job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Job, MetricPoint, Stage
from service.states import JOB_TERMINAL, StageStatus


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


def job_points(session: Session, job: Job, after_id: int = 0) -> list[Point]:
    """The job's points with an id above ``after_id``, by stage, metric and step."""
    stages = {stage.id: stage for stage in job.stages}
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
