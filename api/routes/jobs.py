"""/v1/jobs: submit, list, read, metrics (JSON or a live SSE stream), logs, cancel, retry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import JobDep, JobId, SessionDep, SettingsDep, TeamIdDep, in_session, team_for_write
from api.schemas import (
    JobCreate,
    JobPublic,
    JobsPublic,
    LogLinePublic,
    LogsPublic,
    MetricSeries,
    MetricsPublic,
    error_responses,
    job_public,
    summary_public,
)
from service import jobs as job_service
from service.db import session_scope
from service.models import Job, MetricPoint, Stage
from service.states import JOB_TERMINAL, JobStatus, StageStatus

# How long a repeated Idempotency-Key waits for the first request's job, in steps (about 10 s in all).
KEY_BUSY_WAITS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(400, 401, 404, 413, 422))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "a repeat of an Idempotency-Key: the first job"},
        409: {"description": "a repeat of an Idempotency-Key still being processed: retry (Retry-After)"},
    },
)
async def submit_job(
    body: JobCreate,
    team_id: TeamIdDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Queue a job. A repeat with the same ``Idempotency-Key`` and body returns the first job (200),
    or, while the first is still being created, 409 with Retry-After; the same key with another body
    is a 422."""

    body_hash = job_service.request_hash(body.model_dump())

    def submit(session: Session) -> tuple[JobPublic, bool]:
        team = team_for_write(session, team_id)
        if idempotency_key:  # a repeat: its job at once, before any work (or IdempotencyKeyBusy)
            existing = job_service.job_for_idempotency_key(session, team, idempotency_key, body_hash)
            if existing is not None:
                return job_public(existing), False
        resolved = job_service.resolve_spec(session, team=team, raw=body.spec(), settings=settings)
        job, created = job_service.create_job(
            session,
            team=team,
            resolved=resolved,
            settings=settings,
            name=body.name,
            priority=body.priority,
            idempotency_key=idempotency_key,
            body_hash=body_hash,
        )
        return job_public(job), created

    # A repeat of a key whose first request is still creating its job waits for it here, without a
    # transaction, a connection or a thread, and then answers with that job.
    for wait_s in KEY_BUSY_WAITS_S:
        try:
            public, created = await in_session(submit)
            break
        except job_service.IdempotencyKeyBusy:
            await asyncio.sleep(wait_s)
    else:
        public, created = await in_session(submit)  # still busy: 409 with Retry-After
    if not created:
        response.status_code = status.HTTP_200_OK
    return public


# The two read endpoints are async: the caller's key usually comes from a short cache and the query
# runs in one thread hand-off (in_session), where sync dependencies and endpoints would take five.
@router.get("", response_model=JobsPublic)
async def list_jobs(
    team_id: TeamIdDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    dataset: Annotated[str | None, Query(max_length=300)] = None,
    model: Annotated[str | None, Query(max_length=300, description="weak or strong model")] = None,
    name: Annotated[str | None, Query(max_length=200, description="substring of the job name")] = None,
    sweep_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobsPublic:
    rows, next_cursor = await in_session(
        job_service.list_job_summaries,
        read_only=True,
        team_id=team_id,
        status=status_,
        dataset=dataset,
        model=model,
        name=name,
        sweep_id=sweep_id,
        limit=limit,
        cursor=cursor,
    )
    return JobsPublic(data=[summary_public(row) for row in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
async def read_job(team_id: TeamIdDep, job_id: JobId) -> JobPublic:
    detail = await in_session(job_service.job_detail, team_id=team_id, job_id=job_id, read_only=True)
    return job_public(detail.job, detail.stages)


def metric_series(session: SessionDep, job: Job, after_id: int = 0) -> tuple[list[MetricSeries], int]:
    """The job's curves per stage and metric. A cached stage shows the curves of the run that
    computed its result (when that run was this team's), marked as reused."""
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
    points = session.execute(
        select(MetricPoint.id, MetricPoint.stage_id, MetricPoint.name, MetricPoint.step, MetricPoint.value)
        .where(MetricPoint.stage_id.in_([*stages, *origin_of]), MetricPoint.id > after_id)
        .order_by(MetricPoint.stage_id, MetricPoint.name, MetricPoint.step)
    ).all()
    series: dict[tuple[str, str], MetricSeries] = {}
    last_id = after_id
    for point_id, source_id, name, step, value in points:
        stage = stages[origin_of.get(source_id, source_id)]
        entry = series.setdefault(
            (stage.id, name),
            MetricSeries(
                stage_id=stage.id,
                kind=stage.kind,
                seed=stage.seed,
                name=name,
                steps=[],
                values=[],
                reused=source_id in origin_of,
            ),
        )
        entry.steps.append(step)
        entry.values.append(value)
        last_id = max(last_id, point_id)
    return list(series.values()), last_id


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPublic,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON, or SSE with Accept: text/event-stream",
        }
    },
)
def read_metrics(job: JobDep, session: SessionDep, request: Request) -> MetricsPublic | StreamingResponse:
    """Training curves per stage. With ``Accept: text/event-stream``, a Server-Sent Events stream of
    new points and stage states until the job ends."""
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(_metric_events(job.id, job.team_id, request), media_type="text/event-stream")
    series, _ = metric_series(session, job)
    return MetricsPublic(job_id=job.id, series=series)


async def _metric_events(job_id: str, team_id: str, request: Request) -> AsyncIterator[str]:
    after_id = 0
    while not await request.is_disconnected():
        with session_scope() as session:
            job = job_service.get_job(session, team_id=team_id, job_id=job_id)
            series, after_id = metric_series(session, job, after_id)
            states = {
                stage.id: {"kind": stage.kind, "seed": stage.seed, "status": stage.status, "step": stage.step}
                for stage in job.stages
            }
            finished = job.status in JOB_TERMINAL
            job_status = job.status
        if series:
            yield f"event: metrics\ndata: {json.dumps([s.model_dump() for s in series])}\n\n"
        yield f"event: status\ndata: {json.dumps({'status': job_status, 'stages': states})}\n\n"
        if finished:
            yield "event: end\ndata: {}\n\n"
            return
        await asyncio.sleep(1.0)


@router.get("/{job_id}/logs", response_model=LogsPublic)
def read_logs(
    job: JobDep,
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> LogsPublic:
    lines = job_service.job_logs(session, job=job, after_id=after_id, limit=limit)
    return LogsPublic(data=[LogLinePublic.model_validate(line) for line in lines])


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(409),
)
async def cancel_job(team_id: TeamIdDep, job_id: JobId) -> JobPublic:
    """Cancel: waiting stages stop now; running ones stop at their next training step. 409 if the
    job has already ended."""

    def cancel(session: Session) -> JobPublic:
        job = job_service.get_job(session, team_id=team_for_write(session, team_id).id, job_id=job_id)
        return job_public(job_service.cancel_job(session, job=job))

    return await in_session(cancel)


@router.post(
    "/{job_id}/retry",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(409),
)
async def retry_job(team_id: TeamIdDep, job_id: JobId) -> JobPublic:
    """Run a failed or cancelled job's unfinished stages again; finished stages are kept. 409 if
    the job is not failed or cancelled."""

    def retry(session: Session) -> JobPublic:
        job = job_service.get_job(session, team_id=team_for_write(session, team_id).id, job_id=job_id)
        return job_public(job_service.retry_job(session, job=job))

    return await in_session(retry)
