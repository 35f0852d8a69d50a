"""The FastAPI application: routers under /v1, health and readiness, Prometheus metrics, and
error handlers that turn spec errors into field-level 422s and database outages into 503s."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, FastAPI, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.middleware.sessions import SessionMiddleware

from api import web
from api.routes import datasets, jobs, sweeps, teams
from service.db import get_engine, session_scope
from service.jobs import NotFound
from service.models import Job, Stage
from service.settings import get_settings
from w2s.spec import SpecError

logger = logging.getLogger(__name__)

REQUESTS = Counter("w2s_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("w2s_http_request_seconds", "HTTP request latency", ["method", "route"])
JOBS = Gauge("w2s_jobs", "jobs by status", ["status"])
STAGES = Gauge("w2s_stages", "stages by status and queue", ["status", "queue"])


def create_app() -> FastAPI:
    app = FastAPI(
        title="w2s-service",
        version="0.1.0",
        description="Weak-to-strong generalization experiments as a shared service. "
        "Authenticate with `Authorization: Bearer <API key>`.",
    )
    v1 = APIRouter(prefix="/v1")
    for module in (jobs, sweeps, datasets, teams):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(ops)
    # The dashboard. Its session cookie is read by api/web only: /v1 stays bearer-only.
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    settings = get_settings()
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.session_secret,
        session_cookie="w2s_session",
        max_age=12 * 3600,
        same_site="lax",
        https_only=settings.environment == "production",
    )
    _install_error_handlers(app)

    @app.middleware("http")
    async def _observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        return response

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SpecError)
    async def _spec_error(_: Request, error: SpecError) -> JSONResponse:
        def location(dotted: str) -> list[str | int]:
            return ["body", *(int(part) if part.isdigit() else part for part in dotted.split("."))]

        detail = [{"loc": location(loc), "msg": msg, "type": "spec"} for loc, msg in error.errors]
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, error: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database_down(_: Request, error: Exception) -> JSONResponse:
        logger.warning("database unavailable: %s", str(error).splitlines()[0])
        return JSONResponse(
            {"detail": "the database is unavailable; nothing was lost, retry in a few seconds"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )


ops = APIRouter(tags=["operations"])


@ops.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@ops.get("/readyz")
def readyz() -> JSONResponse:
    """The database and the broker are reachable."""
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unreachable: {str(error).splitlines()[0]}"
    checks["broker"] = _broker_check()
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(checks, status_code=200 if ready else 503)


def _broker_check() -> str:
    settings = get_settings()
    if settings.embedded_broker:
        # The filesystem transport is a directory: reachable as soon as it exists.
        settings.broker_dir.mkdir(parents=True, exist_ok=True)
        return "ok"
    try:
        from kombu import Connection

        with Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        return "ok"
    except Exception as error:
        return f"unreachable: {error}"


@ops.get("/metrics", response_class=PlainTextResponse)
def metrics() -> PlainTextResponse:
    """Prometheus metrics: request counts and latency, jobs and stages by status."""
    try:
        with session_scope() as session:
            JOBS.clear()
            for job_status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                JOBS.labels(job_status).set(count)
            STAGES.clear()
            query = select(Stage.status, Stage.gpu_class, func.count()).group_by(
                Stage.status, Stage.gpu_class
            )
            for stage_status, queue, count in session.execute(query):
                STAGES.labels(stage_status, queue or "unplanned").set(count)
    except OperationalError:
        pass  # still serve the process metrics
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


app = create_app()
