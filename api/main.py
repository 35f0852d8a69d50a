"""The FastAPI application: routers under /v1, health and readiness, Prometheus metrics, and
error handlers that turn spec errors into field-level 422s and database outages into 503s."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram
from sqlalchemy import func, select, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import web
from api.deps import Credentials, SettingsDep, require_admin
from api.docs import install_docs
from api.routes import admin, datasets, jobs, sweeps, teams
from api.schemas import body_location, error_responses
from api.streams import StreamHub
from api.yaml_bodies import YamlBodies
from service import telemetry, uploads
from service.db import database_unreachable, get_engine, lost_a_race, session_scope
from service.errors import LimitExceeded, ServiceError
from service.limits import FailureThrottle
from service.models import Job, Stage
from service.settings import Settings, get_settings
from service.states import InvalidTransition
from w2s.spec import SpecError
from w2s.store import StoreUnavailable

logger = logging.getLogger(__name__)

REQUESTS = Counter("w2s_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("w2s_http_request_seconds", "HTTP request latency", ["method", "route"])
# Summed over the API's processes in multiprocess mode (service/telemetry.py).
STREAMS = Gauge("w2s_open_streams", "live metric streams open", multiprocess_mode="livesum")

# A job spec or a sweep is a few kB; uploads (POST /v1/datasets) have their own W2S_MAX_UPLOAD_MB.
MAX_BODY_BYTES = 1024 * 1024
BODY_LIMIT_EXEMPT = frozenset({"/v1/datasets"})
SEND_JSON = "send a JSON object with Content-Type: application/json"


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Validating a spec builds its losses, which imports torch: seconds on a cold process. Pay that
    # at start-up, not in the first POST (a client with a 5 s timeout would give up).
    if not get_settings().session_secret:
        raise RuntimeError(
            "W2S_SESSION_SECRET is not set: the dashboard's session cookie needs a secret of your own "
            "(or W2S_ENVIRONMENT=development for the published development secret)"
        )
    losses = await run_in_threadpool(importlib.import_module, "w2s.losses")
    # The losses of your own too (W2S_LOSS_MODULES, entry points): one that cannot be loaded stops
    # the API here, naming it, rather than refusing every job that names it.
    await run_in_threadpool(losses.load_plugins)
    # torch and transformers leave millions of long-lived objects; a full garbage collection walked
    # them all (~130 ms) every few large responses (a curve of thousands of points). Frozen, they are
    # never scanned again.
    gc.collect()
    gc.freeze()
    sweeper = asyncio.create_task(_sweep_upload_parts(get_settings()))
    try:
        yield
    finally:
        sweeper.cancel()


async def _sweep_upload_parts(settings: Settings) -> None:
    """Unfinished uploads left by a killed API process: removed at start and then periodically."""
    every_s = min(settings.upload_part_max_age_s / 3, 300.0)
    while True:
        try:
            removed = await run_in_threadpool(
                uploads.remove_stale_parts, settings.uploads_dir, settings.upload_part_max_age_s
            )
            if removed:
                logger.info("removed %d unfinished upload file(s) from %s", removed, settings.uploads_dir)
        except OSError as error:  # a shared folder briefly unreachable: the next sweep tries again
            logger.warning("could not sweep unfinished uploads in %s: %s", settings.uploads_dir, error)
        await asyncio.sleep(every_s)


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="w2s-service",
        version="0.1.0",
        description="Weak-to-strong generalization experiments as a shared service. "
        "Authenticate with `Authorization: Bearer <API key>`.",
        docs_url=None,  # FastAPI's /docs and /redoc load their scripts from a CDN: api/docs.py instead
        redoc_url=None,
    )
    v1 = APIRouter(prefix="/v1")
    for module in (jobs, sweeps, datasets, teams, admin):
        v1.include_router(module.router)
    app.include_router(v1)
    settings = get_settings()
    telemetry.install_store_hook()  # uploads' store retries and outages in /metrics
    # Every live metric stream of this process is served by one hub (api/streams.py).
    app.state.failure_throttle = FailureThrottle(settings.broker_url, settings.broker_key_prefix)
    app.state.stream_hub = StreamHub(
        settings.broker_url, settings.broker_key_prefix, interval_s=settings.stream_interval_s
    )
    app.include_router(ops)
    # The dashboard. Its session cookie is read by api/web only: /v1 stays bearer-only.
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    install_docs(app)
    app.add_middleware(
        SessionMiddleware,
        # Unset, start-up refuses to serve (see _lifespan); the app itself can still be built to read
        # its OpenAPI document.
        secret_key=settings.session_secret or secrets.token_hex(32),
        session_cookie="w2s_session",
        max_age=12 * 3600,
        same_site="lax",
        https_only=settings.environment == "production",
    )
    _install_error_handlers(app)
    app.add_middleware(YamlBodies)  # inside BodyLimit: it reads only bodies already within the limit
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(Observe, api=app)  # added last: the outermost, so it times all the others
    return app


class Observe:
    """Prometheus request counts and latency (until the response starts), and a complete ``Allow``
    header on 405s. Plain ASGI: ``@app.middleware("http")`` (BaseHTTPMiddleware) runs every request
    through an extra task and memory streams, which cost more CPU than a cached read itself."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
                    # Starlette names the methods of the first route whose path matched, not all of them.
                    methods = _documented_methods(self.api, scope["path"])
                    if methods:
                        MutableHeaders(scope=message)["Allow"] = ", ".join(methods)
                route = getattr(scope.get("route"), "path", "unmatched")
                LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)
                REQUESTS.labels(scope["method"], route, str(status_code)).inc()
            await send(message)

        await self.app(scope, receive, observed_send)


def _documented_methods(app: FastAPI, path: str) -> list[str]:
    for template, operations in app.openapi()["paths"].items():
        parts = re.split(r"\{[^}]+\}", template)
        if re.fullmatch("[^/]+".join(re.escape(part) for part in parts), path):
            return sorted(method.upper() for method in operations)
    return []


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413 before any route reads it (the routes
    would hold it in memory); a body without a Content-Length is counted as it arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD")
            or scope["path"] in BODY_LIMIT_EXEMPT
        ):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as streaming responses do

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = (
            f"the request body is over {self.limit // 1024} KiB; a job spec or a sweep is a few kB. "
            "Upload data with POST /v1/datasets and refer to it as 'upload:<id>'"
        )
        response = JSONResponse({"detail": detail}, status_code=status.HTTP_413_CONTENT_TOO_LARGE)
        await response(scope, receive, send)


def _readable_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's errors, with messages that say how to fix a body that is not a JSON object."""
    readable = jsonable_encoder(errors)
    for item in readable:
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "")
            item["msg"] = f"the body is not valid JSON ({reason} at character {item['loc'][-1]}); {SEND_JSON}"
        elif item.get("loc") == ["body"] and item.get("type") in ("model_attributes_type", "dict_type"):
            item["msg"] = f"the body must be a JSON object; {SEND_JSON}"
            item.pop("input", None)  # the whole body, echoed back: no help, and maybe large
    return readable


def _unreadable_body(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text; {SEND_JSON}"
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply; a job spec is a few levels deep"
    return f"the body could not be read; {SEND_JSON}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": _readable_errors(list(error.errors()))},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Any:
        # FastAPI answers a body it cannot decode with a bare "error parsing the body"; say why.
        if error.status_code == status.HTTP_400_BAD_REQUEST and error.__cause__ is not None:
            error = HTTPException(error.status_code, _unreadable_body(error.__cause__), headers=error.headers)
        return await http_exception_handler(request, error)

    @app.exception_handler(SpecError)
    async def _spec_error(_: Request, error: SpecError) -> JSONResponse:
        detail = [{"loc": body_location(loc), "msg": msg, "type": "spec"} for loc, msg in error.errors]
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, error: ServiceError) -> JSONResponse:
        body: dict[str, Any] = {"detail": str(error)}
        headers = {}
        if isinstance(error, LimitExceeded):
            body |= {"limit": error.limit, "limit_value": error.value}
        if error.retry_after_s is not None:
            headers["Retry-After"] = str(error.retry_after_s)
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    @app.exception_handler(InvalidTransition)
    async def _conflict(_: Request, error: InvalidTransition) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(DataError)
    async def _unstorable_value(_: Request, error: DataError) -> JSONResponse:
        # Bad input, not an outage: Postgres refuses NUL characters in text and out-of-range numbers.
        reason = str(error.orig or error).splitlines()[0]
        detail = f"a value in the request cannot be stored ({reason}); remove NUL characters (\\u0000)"
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, error: IntegrityError) -> JSONResponse:
        # A unique constraint: a concurrent request created the same thing first.
        logger.info("integrity error answered 409: %s", str(error.orig or error).splitlines()[0])
        return JSONResponse(
            {"detail": "this conflicts with an existing object (a name or key already in use); change it"},
            status_code=status.HTTP_409_CONFLICT,
        )

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, error: DBAPIError) -> JSONResponse:
        if lost_a_race(error):  # still losing after run_transaction's retries: heavy contention
            logger.warning("transaction kept losing races: %s", str(error.orig).splitlines()[0])
            return JSONResponse(
                {"detail": "the database is busy with conflicting changes; nothing was lost, retry"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "1"},
            )
        if database_unreachable(error):
            logger.warning("database unavailable: %s", str(error).splitlines()[0])
            return JSONResponse(
                {"detail": "the database is unavailable; nothing was lost, retry in a few seconds"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
        return _internal_error(request, error)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(_: Request, error: StoreUnavailable) -> JSONResponse:
        # The log names the store and the error; the answer names neither (a bucket is no user's
        # business).
        logger.warning("artifact store unavailable: %s", str(error).splitlines()[0])
        return JSONResponse(
            {"detail": "the artifact store is unavailable; nothing was lost, retry in a few seconds"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        return _internal_error(request, error)


def _internal_error(request: Request, error: BaseException) -> JSONResponse:
    """A bug: 500 with a request id that is also in the log beside the traceback."""
    request_id = uuid.uuid4().hex[:16]
    logger.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=error)
    return JSONResponse(
        {
            "detail": f"internal error; quote request id {request_id} to the operators",
            "request_id": request_id,
        },
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        headers={"X-Request-ID": request_id},
    )


ops = APIRouter(tags=["operations"])


@ops.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@ops.get("/readyz")
def readyz() -> JSONResponse:
    """The database, the broker and the artifact store are reachable."""
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unreachable: {str(error).splitlines()[0]}"
    checks["broker"] = _broker_check()
    checks["store"] = _store_check()
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(checks, status_code=200 if ready else 503)


_store_probe = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-probe")


def _store_check(timeout_s: float = 3.0) -> str:
    """The artifact store answers whether its root exists within ``timeout_s`` (asked once:
    readiness reports the store as it is now; an empty S3 prefix answers no, which is an answer)."""
    from w2s.store import ArtifactStore

    def probe() -> None:
        store = ArtifactStore(get_settings().store_uri, retry_s=0)
        store.fs.exists(store.root)

    future = _store_probe.submit(probe)
    try:
        future.result(timeout=timeout_s)
        return "ok"
    except concurrent.futures.TimeoutError:
        return f"unreachable: no answer within {timeout_s:.0f} s"
    except Exception as error:
        return f"unreachable: {type(error).__name__}: {str(error).strip()[:200]}"


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


@ops.get(
    "/metrics",
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text"},
        **error_responses(401, 403),
    },
)
def metrics(request: Request, settings: SettingsDep, credentials: Credentials) -> PlainTextResponse:
    """Prometheus metrics: request counts and latency, jobs and stages by status. Needs the admin
    key unless W2S_METRICS_PUBLIC is set (the counts describe every team's work)."""
    if not settings.metrics_public:
        require_admin(request, settings, credentials)
    STREAMS.set(request.app.state.stream_hub.open_streams)

    def counts() -> tuple[list[Any], list[Any]]:
        with session_scope(read_only=True) as session:
            jobs = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            stages = session.execute(
                select(Stage.status, Stage.gpu_class, func.count()).group_by(Stage.status, Stage.gpu_class)
            ).all()
            return list(jobs), list(stages)

    return PlainTextResponse(telemetry.api_metrics(counts), media_type=CONTENT_TYPE_LATEST)
