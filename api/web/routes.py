"""Dashboard routes: HTML pages, the small JSON endpoints the pages poll, CSV/JSON exports, and the
cancel/retry actions. Thin like the /v1 routes: they call service functions and render the /v1
schemas; api/web/views.py turns those into what the templates draw.

The figures are SVGs drawn here by w2s.plots (the same code as `w2s sweep plot`): the pages show
them as images and reload them when the data changes; no chart script runs in the browser.

Pages authenticate with the session cookie only, and /v1 never reads it. State-changing requests
are POSTs that carry the session's CSRF token (a form field or the X-CSRF-Token header)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, cast
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Header, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.orm import Session
from starlette.templating import Jinja2Templates

from api.deps import (
    SessionDep,
    SettingsDep,
    client_address,
    failure_throttle,
    known_key,
    record_failure,
    signin_policy,
)
from api.schemas import (
    ExportPublic,
    JobPublic,
    LogLinePublic,
    MetricSeries,
    SweepPublic,
    SweepSummary,
    UsagePublic,
    job_public,
)
from api.web import views
from api.web.session import (
    CSRF_FIELD,
    LoginRequired,
    PageTeamDep,
    UiTeamDep,
    csrf_token,
    csrf_valid,
    safe_next,
    sign_in,
    sign_out,
)
from service import exports as export_service
from service import jobs as job_service
from service import sweeps as sweep_service
from service.auth import hash_key
from service.errors import NotFound, ServiceError
from service.metrics import job_series, latest_point_id
from service.models import Job, Sweep, Team
from service.states import (
    JOB_TERMINAL,
    ExportStatus,
    InvalidTransition,
    JobStatus,
    StageStatus,
    has_result,
    is_terminal,
)
from service.usage import team_usage
from w2s import plots

logger = logging.getLogger(__name__)

HERE = FilePath(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
JOBS_PER_PAGE = 50
LOG_LINES = 2000
SVG = "image/svg+xml"
CURVE_PANELS: tuple[plots.Panel, ...] = ("loss", "accuracy")


def _static_version() -> str:
    # Part of every static URL, so a deploy with new CSS/JS is never served from a stale cache.
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.glob("*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


# StrictUndefined: a misspelt variable fails the page tests instead of rendering as blank.
_env = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape(), undefined=StrictUndefined
)
_env.filters.update(views.FILTERS)
_env.globals.update(
    static_version=_static_version(),
    job_statuses=views.JOB_STATUSES,
    # Templates compare statuses through these, never through literal strings (service/states.py).
    JobStatus=JobStatus,
    StageStatus=StageStatus,
    ExportStatus=ExportStatus,
    has_result=has_result,
    is_terminal=is_terminal,
    example_curl=views.example_curl,
    elapsed=views.elapsed,
)
templates = Jinja2Templates(env=_env)

# Pages may load scripts, styles and images from this origin only: no CDN, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages hold a team's data
}


def _context(request: Request, **context: Any) -> dict[str, Any]:
    team: Team | None = getattr(request.state, "team", None)
    # A flash message shows once: only a full page takes it from the session, never a fragment.
    flash = context.pop("flash") if "flash" in context else request.session.pop("flash", None)
    return {
        "request": request,
        "team": team,
        "key_prefix": getattr(request.state, "key_prefix", "") if team else "",
        "csrf": csrf_token(request),
        "base_url": str(request.base_url).rstrip("/"),
        "nav": "",
        "flash": flash,
        **context,
    }


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, _context(request, **context), status_code=status_code)


def fragment(request: Request, name: str, **context: Any) -> str:
    """A partial template as a string, for the JSON the pages poll: one template draws a table
    both on the first render and on every live update."""
    return _env.get_template(name).render(_context(request, flash=None, **context))


def error_page(request: Request, status_code: int, title: str, message: str) -> HTMLResponse:
    return render(
        request, "error.html", status_code=status_code, code=status_code, title=title, message=message
    )


class PageRoute(APIRoute):
    """Turns what a page can run into (no session, an unknown or foreign id, the database down, a
    bad form) into a redirect or an error page in the layout, instead of the API's JSON errors."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired as error:
                response = RedirectResponse(
                    f"/login?next={quote(error.next_url, safe='/')}", status.HTTP_303_SEE_OTHER
                )
            except NotFound as error:
                response = error_page(request, 404, "Not found", f"{str(error).capitalize()}.")
            except ServiceError as error:
                response = error_page(request, error.status_code, "Request refused", str(error))
            except DataError:
                # A value Postgres cannot hold (a NUL character in an id): bad input, not an outage.
                response = error_page(
                    request, 400, "Bad request", "The address holds a NUL character; check the link."
                )
            except (OperationalError, DBAPIError) as error:
                logger.warning("dashboard: database unavailable: %s", str(error).splitlines()[0])
                response = error_page(
                    request,
                    503,
                    "The database is unavailable",
                    "The service cannot reach its database right now. Nothing was lost; "
                    "this page will work again once it is back. Try again in a few seconds.",
                )
                response.headers["Retry-After"] = "5"
            except RequestValidationError as error:
                fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) for e in error.errors())
                response = error_page(request, 400, "Bad request", f"Check these fields: {fields}.")
            except HTTPException as error:
                response = error_page(request, error.status_code, "Request refused", str(error.detail))
            response.headers.update(SECURITY_HEADERS)
            return response

        return guarded


pages = APIRouter(route_class=PageRoute, include_in_schema=False, default_response_class=HTMLResponse)
ui = APIRouter(prefix="/ui", include_in_schema=False)


def _page_team(request: Request, team: Team) -> Team:
    request.state.team = team  # for the layout, also on error pages
    return team


# ---------------------------------------------------------------------------------------------
# Sign in and out


@pages.get("/login")
def login_form(request: Request, next: Annotated[str, Query(max_length=2000)] = "/") -> HTMLResponse:
    return render(request, "login.html", next=safe_next(next), error=None)


@pages.post("/login", response_model=None)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    target = safe_next(next)
    if not csrf_valid(request, csrf):
        # Login CSRF: a foreign page must not sign the browser in to the attacker's team.
        error = "This sign-in form expired. Paste your key again."
        return render(request, "login.html", status_code=400, next=target, error=error)
    sources = [(signin_policy(settings), client_address(request))]
    wait = failure_throttle(request).wait_s(*sources[0])
    # A correct key signs in whoever else failed from this address (a shared NAT or proxy); a wrong
    # one is refused from a snapshot of the keys, without a lookup (api.deps.known_key).
    if wait is not None and not known_key(hash_key(api_key.strip())):
        error = f"Too many failed sign-ins from your address: wait {wait} s, then paste your key again."
        page = render(request, "login.html", status_code=429, next=target, error=error)
        page.headers["Retry-After"] = str(wait)
        return page
    if sign_in(request, session, api_key) is None:
        record_failure(request, "signin", sources)
        error = "That key is not valid: check it was pasted whole, or ask an admin for a new one."
        return render(request, "login.html", status_code=401, next=target, error=error)
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


@pages.post("/logout")
def logout(request: Request, session: SessionDep) -> RedirectResponse:
    # POST only: a link or an image on another page must not be able to act on the session.
    sign_out(request, session)
    return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)


# ---------------------------------------------------------------------------------------------
# Jobs


class JobFilters(BaseModel):
    status: str = ""
    dataset: str = ""
    name: str = ""
    cursor: str = ""

    @property
    def active(self) -> bool:
        return bool(self.status or self.dataset or self.name)

    def query(self, cursor: bool = True) -> str:
        fields = self.model_dump(exclude=set() if cursor else {"cursor"})
        return "&".join(f"{k}={quote(v)}" for k, v in fields.items() if v)


def _filters(status_: str, dataset: str, name: str, cursor: str) -> JobFilters:
    # An unknown status in a hand-edited URL filters nothing rather than failing the page.
    return JobFilters(
        status=status_ if status_ in views.JOB_STATUSES else "", dataset=dataset, name=name, cursor=cursor
    )


FilterStatus = Annotated[str, Query(alias="status", max_length=20)]
FilterDataset = Annotated[str, Query(max_length=300)]
FilterName = Annotated[str, Query(max_length=200)]
FilterCursor = Annotated[str, Query(max_length=500)]
JobId = Annotated[str, Path(max_length=64)]
SweepId = Annotated[str, Path(max_length=64)]


def _job_rows(session: SessionDep, team: Team, filters: JobFilters) -> tuple[list[views.JobRow], str | None]:
    def listing(cursor: str | None) -> tuple[list[Job], str | None]:
        return job_service.list_jobs(
            session,
            team_id=team.id,
            status=filters.status or None,
            dataset=filters.dataset or None,
            name=filters.name or None,
            limit=JOBS_PER_PAGE,
            cursor=cursor,
        )

    try:
        jobs, next_cursor = listing(filters.cursor or None)
    except ValueError:  # a stale or hand-edited cursor: start at the newest page
        filters.cursor = ""
        jobs, next_cursor = listing(None)
    reference = views.now()
    return [views.job_row(job, reference) for job in jobs], next_cursor


def _jobs_context(session: SessionDep, team: Team, filters: JobFilters) -> dict[str, Any]:
    rows, next_cursor = _job_rows(session, team, filters)
    return {"rows": rows, "next_cursor": next_cursor, "filters": filters}


@pages.get("/")
def jobs_page(
    request: Request,
    session: SessionDep,
    team: PageTeamDep,
    status_: FilterStatus = "",
    dataset: FilterDataset = "",
    name: FilterName = "",
    cursor: FilterCursor = "",
) -> HTMLResponse:
    _page_team(request, team)
    filters = _filters(status_, dataset, name, cursor)
    return render(request, "jobs.html", nav="jobs", **_jobs_context(session, team, filters))


class JobsLive(BaseModel):
    jobs: list[views.JobRow]
    next_cursor: str | None
    html: str


@ui.get("/jobs.json", response_model=JobsLive)
def jobs_live(
    request: Request,
    session: SessionDep,
    team: UiTeamDep,
    status_: FilterStatus = "",
    dataset: FilterDataset = "",
    name: FilterName = "",
    cursor: FilterCursor = "",
) -> JobsLive:
    """The jobs table the jobs page polls: rows as data, and the table as HTML."""
    request.state.team = team
    context = _jobs_context(session, team, _filters(status_, dataset, name, cursor))
    html = fragment(request, "_jobs_table.html", **context)
    return JobsLive(jobs=context["rows"], next_cursor=context["next_cursor"], html=html)


def _exports(session: Session, job_id: str) -> list[ExportPublic]:
    return [ExportPublic.model_validate(export) for export in export_service.job_exports(session, job_id)]


def _job_fragments(request: Request, job: JobPublic, exports: Sequence[ExportPublic] = ()) -> dict[str, str]:
    groups, span = views.timeline(job)
    return {
        "header": fragment(
            request, "_job_header.html", job=job, actions=views.job_actions(job), exports=list(exports)
        ),
        "timeline": fragment(request, "_job_timeline.html", job=job, groups=groups, span=span),
        "results": fragment(
            request,
            "_job_results.html",
            job=job,
            rows=views.results_rows(job.results),
            chains=views.chain_tables(job.results),
            flags=views.flags(job.results),
        ),
    }


def _logs(session: SessionDep, job: Job, after_id: int) -> list[LogLinePublic]:
    lines = job_service.job_logs(session, job=job, after_id=after_id, limit=LOG_LINES)
    return [LogLinePublic.model_validate(line) for line in lines]


def _stage_names(job: JobPublic) -> dict[str, str]:
    return {s.id: f"{views.stage_label(s.kind)}/{s.seed}" for s in job.stages}


# How the job page's curves are drawn: a link with these parameters opens the page as it was left.
SmoothingQuery = Annotated[
    float,
    Query(ge=0.0, lt=1.0, description="EMA weight of the curves' smoothing: 0 none, 0.99 the most"),
]
KindQuery = Annotated[str | None, Query(max_length=100, description="only this stage kind's curves")]


def _curve_kind(job: Job, kind: str | None) -> str | None:
    """The stage kind asked for, if the job has it; "" or None: every kind."""
    kinds = list(dict.fromkeys(stage.kind for stage in job.stages))
    if kind and kind not in kinds:
        raise NotFound(f"no stage kind {kind!r} in this job: it has {', '.join(kinds)}")
    return kind or None


def _curve_controls(job: Job, smoothing: float, kind: str | None) -> dict[str, Any]:
    """The curves' controls as the page opens: the stage kinds to pick from, in run order."""
    kinds = dict.fromkeys(stage.kind for stage in job.stages)
    return {
        "smoothing": smoothing,
        "kind": kind or "",
        "kinds": [(value, plots.kind_label(value)) for value in kinds],
        "query": urlencode({"smoothing": f"{smoothing:g}", **({"kind": kind} if kind else {})}),
    }


@pages.get("/jobs/{job_id}")
def job_page(
    request: Request,
    session: SessionDep,
    team: PageTeamDep,
    job_id: JobId,
    smoothing: SmoothingQuery = plots.DEFAULT_SMOOTHING,
    kind: KindQuery = None,
) -> HTMLResponse:
    _page_team(request, team)
    job = job_service.get_job(session, team_id=team.id, job_id=job_id)
    kind = _curve_kind(job, kind)
    public = job_public(job, events=job_service.stage_events(session, [s.id for s in job.stages]))
    metrics_after = latest_point_id(session, job)
    logs = _logs(session, job, 0)
    data = {
        "job_id": job.id,
        "terminal": job.status in JOB_TERMINAL,
        "metrics_after": metrics_after,
        "logs_after": logs[-1].id if logs else 0,
        "stage_names": _stage_names(public),
    }
    return render(
        request,
        "job.html",
        nav="jobs",
        job=public,
        fragments=_job_fragments(request, public, _exports(session, job.id)),
        logs=logs,
        stage_names=_stage_names(public),
        curl=views.curl_command(public, str(request.base_url)),
        data=data,
        curves=_curve_controls(job, smoothing, kind),
    )


class JobLive(BaseModel):
    job: JobPublic
    terminal: bool
    fragments: dict[str, str]
    metrics_after: int = Field(description="the newest metric point's id: the curves' version")
    logs: list[LogLinePublic]
    logs_after: int
    stage_names: dict[str, str]


@ui.get("/jobs/{job_id}.json", response_model=JobLive)
def job_live(
    request: Request,
    session: SessionDep,
    team: UiTeamDep,
    job_id: JobId,
    metrics_after: Annotated[int, Query(ge=0)] = 0,
    logs_after: Annotated[int, Query(ge=0)] = 0,
) -> JobLive:
    """What changed on a job page since the last poll: the newest metric point (the page reloads its
    curves when it moves), log lines after the given id, and the header, timeline and results."""
    request.state.team = team
    job = job_service.get_job(session, team_id=team.id, job_id=job_id)
    public = job_public(job, events=job_service.stage_events(session, [s.id for s in job.stages]))
    last_metric = latest_point_id(session, job, metrics_after)
    logs = _logs(session, job, logs_after)
    return JobLive(
        job=public,
        terminal=job.status in JOB_TERMINAL,
        fragments=_job_fragments(request, public, _exports(session, job.id)),
        metrics_after=last_metric,
        logs=logs,
        logs_after=logs[-1].id if logs else logs_after,
        stage_names=_stage_names(public),
    )


@pages.get("/jobs/{job_id}/curves/{panel}.svg", response_model=None)
def job_curves(
    request: Request,
    session: SessionDep,
    team: PageTeamDep,
    job_id: JobId,
    panel: Annotated[str, Path(max_length=20)],
    smoothing: SmoothingQuery = plots.DEFAULT_SMOOTHING,
    kind: KindQuery = None,
) -> Response:
    """The job page's training curves, one figure (loss, or accuracy) with a small plot per stage
    kind (or only ``kind``'s), from every metric point the job has: what GET /v1/jobs/{id}/metrics
    returns, drawn."""
    _page_team(request, team)
    job = job_service.get_job(session, team_id=team.id, job_id=job_id)
    if panel not in CURVE_PANELS:
        raise NotFound(f"no {panel!r} curves: there are {' and '.join(CURVE_PANELS)}")
    kind = _curve_kind(job, kind)
    # A panel a few hundred pixels wide shows no more than this many points of a curve.
    series = [MetricSeries(**entry) for entry in job_series(session, job, max_points=500)]
    data = plots.curves_figure_data(series, order=[stage.id for stage in job.stages])  # panels in run order
    svg = plots.render_curves_svg(data, cast(plots.Panel, panel), smoothing=smoothing, kind=kind)
    return Response(svg, media_type=SVG)


def _job_action(
    request: Request,
    session: SessionDep,
    team: Team,
    job_id: JobId,
    token: str | None,
    action: Callable[[Job], Any],
    done: str,
) -> Response:
    wants_json = "application/json" in request.headers.get("accept", "")
    if not csrf_valid(request, token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "This form expired: reload the page and try again.")
    job = job_service.get_job(session, team_id=team.id, job_id=job_id)
    try:
        action(job)
        # Committed before the redirect, so the page it leads to already shows the new status.
        session.commit()
        message, kind, code = done, "ok", status.HTTP_202_ACCEPTED
    except InvalidTransition as error:
        message, kind, code = f"Not possible: the job is {error.current}.", "error", status.HTTP_409_CONFLICT
    if wants_json:
        return JSONResponse({"status": job.status, "message": message}, status_code=code)
    request.session["flash"] = {"kind": kind, "text": message}
    return RedirectResponse(f"/jobs/{job.id}", status.HTTP_303_SEE_OTHER)


CsrfForm = Annotated[str | None, Form(alias=CSRF_FIELD, max_length=200)]
CsrfHeader = Annotated[str | None, Header(alias="X-CSRF-Token", max_length=200)]


# What each job action does and what the page says after it.
JOB_ACTIONS: dict[str, tuple[Callable[[Session, Job], Any], str]] = {
    "cancel": (
        lambda session, job: job_service.cancel_job(session, job=job),
        "Cancelled. Running stages stop at their next training step.",
    ),
    "retry": (
        lambda session, job: job_service.retry_job(session, job=job),
        "Queued again: the failed and cancelled stages will run; finished ones are kept.",
    ),
}


@pages.post("/jobs/{job_id}/{action}", response_model=None)
def job_action(
    request: Request,
    session: SessionDep,
    team: PageTeamDep,
    job_id: JobId,
    action: Literal["cancel", "retry"],
    csrf: CsrfForm = None,
    csrf_header: CsrfHeader = None,
) -> Response:
    """The job page's cancel and retry buttons (the same service functions as /v1)."""
    _page_team(request, team)
    act, done = JOB_ACTIONS[action]
    return _job_action(
        request, session, team, job_id, csrf_header or csrf, lambda job: act(session, job), done
    )


# ---------------------------------------------------------------------------------------------
# Sweeps


@pages.get("/sweeps")
def sweeps_page(
    request: Request, session: SessionDep, team: PageTeamDep, cursor: FilterCursor = ""
) -> HTMLResponse:
    _page_team(request, team)
    try:
        listings, next_cursor = sweep_service.list_sweeps(
            session, team_id=team.id, limit=JOBS_PER_PAGE, cursor=cursor or None
        )
    except ValueError:
        listings, next_cursor = sweep_service.list_sweeps(session, team_id=team.id, limit=JOBS_PER_PAGE)
    sweeps = [SweepSummary.model_validate(dataclasses.asdict(item)) for item in listings]
    return render(request, "sweeps.html", nav="sweeps", sweeps=sweeps, next_cursor=next_cursor)


def _sweep(session: SessionDep, team: Team, sweep_id: str) -> SweepPublic:
    sweep: Sweep = sweep_service.get_sweep(session, team_id=team.id, sweep_id=sweep_id)
    report = sweep_service.sweep_report(session, sweep=sweep)
    return SweepPublic.model_validate(dataclasses.asdict(report))


def _download(sweep_id: str, extension: str) -> dict[str, str]:
    return {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="sweep-{sweep_id}.{extension}"'}


# Declared before /sweeps/{sweep_id}, whose parameter would otherwise swallow "<id>.csv".
@pages.get("/sweeps/{sweep_id}.csv", response_model=None)
def sweep_csv(request: Request, session: SessionDep, team: PageTeamDep, sweep_id: SweepId) -> Response:
    _page_team(request, team)
    sweep = _sweep(session, team, sweep_id)
    return Response(
        views.sweep_csv(sweep), media_type="text/csv; charset=utf-8", headers=_download(sweep.id, "csv")
    )


@pages.get("/sweeps/{sweep_id}.json", response_model=None)
def sweep_json(request: Request, session: SessionDep, team: PageTeamDep, sweep_id: SweepId) -> Response:
    """The sweep exactly as GET /v1/sweeps/{id} returns it."""
    _page_team(request, team)
    sweep = _sweep(session, team, sweep_id)
    return Response(
        sweep.model_dump_json(indent=2), media_type="application/json", headers=_download(sweep.id, "json")
    )


def _sweep_figure(sweep: SweepPublic) -> plots.SweepFigureData:
    # From the sweep's JSON, exactly as `w2s sweep plot` reads it from GET /v1/sweeps/{id}.
    document = sweep.model_dump(mode="json")
    return plots.sweep_figure_data(document["grid"], document["table"], name=document["name"] or "")


def _figure_version(data: plots.SweepFigureData) -> str:
    # Changes when, and only when, a value in the figure does: the page reloads the image then.
    return hashlib.sha256(repr(data).encode()).hexdigest()[:16]


@pages.get("/sweeps/{sweep_id}/plot.svg", response_model=None)
def sweep_plot(request: Request, session: SessionDep, team: PageTeamDep, sweep_id: SweepId) -> Response:
    """The sweep page's figure (see w2s.plots): the one `w2s sweep plot --out plot.svg` writes."""
    _page_team(request, team)
    sweep = _sweep(session, team, sweep_id)
    return Response(plots.render_sweep_svg(_sweep_figure(sweep)), media_type=SVG)


def _sweep_fragments(request: Request, sweep: SweepPublic) -> dict[str, str]:
    losses = views.sweep_losses(sweep)
    return {
        "header": fragment(request, "_sweep_header.html", sweep=sweep),
        "tables": fragment(request, "_sweep_tables.html", sweep=sweep, losses=losses),
    }


@pages.get("/sweeps/{sweep_id}")
def sweep_page(request: Request, session: SessionDep, team: PageTeamDep, sweep_id: SweepId) -> HTMLResponse:
    _page_team(request, team)
    sweep = _sweep(session, team, sweep_id)
    data = {
        "sweep_id": sweep.id,
        "terminal": sweep.status in JOB_TERMINAL,
        "plot_version": _figure_version(_sweep_figure(sweep)),
    }
    return render(
        request,
        "sweep.html",
        nav="sweeps",
        sweep=sweep,
        fragments=_sweep_fragments(request, sweep),
        data=data,
    )


class SweepLive(BaseModel):
    sweep: SweepPublic
    terminal: bool
    plot_version: str = Field(description="changes when the figure's data does")
    fragments: dict[str, str]


@ui.get("/sweeps/{sweep_id}.json", response_model=SweepLive)
def sweep_live(request: Request, session: SessionDep, team: UiTeamDep, sweep_id: SweepId) -> SweepLive:
    request.state.team = team
    sweep = _sweep(session, team, sweep_id)
    return SweepLive(
        sweep=sweep,
        terminal=sweep.status in JOB_TERMINAL,
        plot_version=_figure_version(_sweep_figure(sweep)),
        fragments=_sweep_fragments(request, sweep),
    )


# ---------------------------------------------------------------------------------------------
# Team


@pages.get("/team")
def team_page(
    request: Request, session: SessionDep, settings: SettingsDep, team: PageTeamDep
) -> HTMLResponse:
    _page_team(request, team)
    usage = UsagePublic(**team_usage(session, team=team, settings=settings))
    reference = views.now()
    active = {
        state: [
            views.job_row(job, reference)
            for job in job_service.list_jobs(session, team_id=team.id, status=state, limit=20)[0]
        ]
        for state in (JobStatus.running, JobStatus.queued)
    }
    return render(request, "team.html", nav="team", usage=usage, active=active)


router = APIRouter()
router.include_router(pages)
router.include_router(ui)
