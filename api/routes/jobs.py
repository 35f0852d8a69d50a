"""/v1/jobs: submit, list, read, metrics (JSON or a live SSE stream), logs, cancel, retry."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.deps import (
    Credentials,
    JobDep,
    JobId,
    SessionDep,
    SettingsDep,
    TeamIdDep,
    in_session,
    team_for_write,
)
from api.schemas import (
    ExportCreate,
    ExportPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    LogLinePublic,
    LogsPublic,
    MetricsPublic,
    error_responses,
    job_public,
    summary_public,
)
from api.streams import StreamHub
from service import exports as export_service
from service import jobs as job_service
from service.auth import hash_key
from service.limits import limit_of
from service.metrics import job_series
from service.models import Team
from service.states import JobStatus

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
    """Queue a job (a JSON body, or YAML with ``Content-Type: application/yaml``). A repeat with the
    same ``Idempotency-Key`` and body returns the first job (200),
    or, while the first is still being created, 409 with Retry-After; the same key with another body
    is a 422."""

    body_hash = job_service.request_hash(body.model_dump())

    def submit(session: Session) -> tuple[JobPublic, bool]:
        team = team_for_write(session, team_id)
        if idempotency_key:  # a repeat: its job at once, before any work (or IdempotencyKeyBusy)
            existing = job_service.job_for_idempotency_key(session, team, idempotency_key, body_hash)
            if existing is not None:
                return job_public(existing), False
        raw = body.spec()
        job_service.check_size_first(team, settings, raw)
        resolved = job_service.resolve_spec(session, team=team, raw=raw, settings=settings)
        job, created = job_service.create_job(
            session,
            team=team,
            resolved=resolved,
            settings=settings,
            name=body.name,
            priority=body.priority,
            stage_time_limit_s=body.stage_time_limit_s,
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
    return job_public(detail.job, detail.stages, detail.events)


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPublic,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON, or SSE with Accept: text/event-stream",
        },
        **error_responses(429),
    },
)
async def read_metrics(
    job_id: JobId,
    team_id: TeamIdDep,
    credentials: Credentials,
    request: Request,
    settings: SettingsDep,
    max_points: Annotated[
        int | None,
        Query(ge=10, le=100_000, description="at most this many points per curve (LTTB); default: as stored"),
    ] = None,
) -> MetricsPublic | StreamingResponse:
    """Training curves per stage. With ``Accept: text/event-stream``, a Server-Sent Events stream:
    the curves so far, then new points and stage states (``metrics``, ``status``) every
    ``W2S_STREAM_INTERVAL_S``, ``end`` when the job is over, or ``error`` when the key is revoked
    or the team disabled. A team may hold ``W2S_MAX_STREAMS_PER_TEAM`` streams open (429 above)."""

    def read(session: Session) -> MetricsPublic:
        job = job_service.get_job(session, team_id=team_id, job_id=job_id)
        most = min(max_points or settings.metric_points_per_series, settings.metric_points_per_series)
        return MetricsPublic(job_id=job.id, series=job_series(session, job, most))  # type: ignore[arg-type]

    def stream_limit(session: Session) -> int:
        job_service.get_job(session, team_id=team_id, job_id=job_id)  # 404 for a job not the team's
        return limit_of(session.get_one(Team, team_id), settings, "max_streams_per_team")

    if "text/event-stream" not in request.headers.get("accept", ""):
        return await in_session(read, read_only=True)
    limit = await in_session(stream_limit, read_only=True)
    assert credentials is not None  # TeamIdDep checked them
    hub: StreamHub = request.app.state.stream_hub
    events = await hub.stream(job_id, team_id, hash_key(credentials.credentials), limit)
    # No buffering by proxies (nginx), so each event reaches the viewer when it is sent.
    return StreamingResponse(events, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


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


@router.post(
    "/{job_id}/export",
    response_model=ExportPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(409),
)
async def export_job(
    body: ExportCreate, team_id: TeamIdDep, job_id: JobId, settings: SettingsDep
) -> ExportPublic:
    """Export a succeeded job to MLflow or Weights & Biases now, or again (succeeded jobs are
    exported by themselves where the team has a destination). The export runs as a task of its own
    and is retried while the tool is unreachable: follow it with GET /v1/jobs/{id}/exports. 409 if
    the job has not succeeded; 422 if no destination is configured for the tool."""

    def request(session: Session) -> ExportPublic:
        job = job_service.get_job(session, team_id=team_for_write(session, team_id).id, job_id=job_id)
        return ExportPublic.model_validate(export_service.request_export(session, job, body.to, settings))

    return await in_session(request)


@router.get("/{job_id}/exports", response_model=list[ExportPublic])
def list_exports(job: JobDep, session: SessionDep) -> list[ExportPublic]:
    """The job's exports to tracking tools: state, tries, the next try, and a link to the run."""
    return [ExportPublic.model_validate(export) for export in export_service.job_exports(session, job.id)]
