"""Job service functions: create, list, read, cancel, retry. They take keyword arguments, raise
``ValueError``/``LookupError`` a caller can show, and know nothing of HTTP."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Row, Select, bindparam, func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, joinedload, selectinload

from service.models import Dataset, Job, LogLine, Stage, Team, new_id, utcnow
from service.settings import Settings
from service.states import JobStatus, StageStatus, check_job_transition, check_stage_transition
from w2s.spec import CustomDatasetSpec, JobSpec, SpecError, parse_spec

UPLOAD_PREFIX = "upload:"


class NotFound(LookupError):
    """The object does not exist for this team (another team's objects are 'not found' too)."""


@dataclass(frozen=True)
class StageTemplate:
    kind: str
    seed: int
    order: int
    depends_on_kind: str | None  # students need the weak stage of their seed


def expand_stages(spec: JobSpec) -> list[StageTemplate]:
    """The stages of a job in run order: per seed, weak, ceiling, one student per loss."""
    templates: list[StageTemplate] = []
    for seed in spec.seeds:
        templates.append(StageTemplate("weak", seed, len(templates), None))
        templates.append(StageTemplate("ceiling", seed, len(templates), None))
        for loss in spec.losses:
            templates.append(StageTemplate(f"student:{loss.label}", seed, len(templates), "weak"))
    return templates


def _inside(path: Path, roots: list[Path]) -> bool:
    try:
        resolved = path.resolve()  # symlinks followed: a link that leads out is outside
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a loop: not a usable path either
        return False
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _runs_model_code(model: str) -> bool:
    """Whether a local model directory's configs name their own Python classes (``auto_map``),
    which transformers can only load by running that code (``trust_remote_code``)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((Path(model).expanduser() / name).read_text())
        except (OSError, RuntimeError, ValueError):
            continue  # a hub id, or no such file: nothing to run from here
        if isinstance(config, dict) and config.get("auto_map"):
            return True
    return False


def resolve_spec(session: Session, *, team: Team, raw: dict[str, Any], settings: Settings) -> JobSpec:
    """Validate a spec for ``team``: uploaded datasets by id, file paths only inside the data
    directory, and ``trust_remote_code`` only where an admin allowed it."""
    raw = json.loads(json.dumps(raw))  # a private copy: we rewrite the dataset reference below
    errors: list[tuple[str, str]] = []
    dataset = raw.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else None
    if isinstance(name, str) and name.startswith(UPLOAD_PREFIX):
        upload = session.get(Dataset, name.removeprefix(UPLOAD_PREFIX))
        if upload is None or upload.team_id != team.id:
            raise SpecError(
                [("dataset.name", f"no uploaded dataset {name!r}; list yours with GET /v1/datasets")]
            )
        dataset["name"] = {"path": upload.path, "text": upload.text_column, "label": upload.label_column}
    spec = parse_spec(raw)
    if isinstance(spec.dataset.name, CustomDatasetSpec):
        # The team's own uploads only: another team's files are outside, like any other path.
        roots = [settings.uploads_dir / team.id] + ([settings.data_dir] if settings.data_dir else [])
        for field in ("path", "test_path"):
            value = getattr(spec.dataset.name, field)
            if value is not None and not _inside(Path(value), roots):
                errors.append(
                    (
                        f"dataset.name.{field}",
                        f"{value!r} is outside the allowed data directories; "
                        "upload the file with POST /v1/datasets and use its id as 'upload:<id>'",
                    )
                )
    allowed = settings.allow_trust_remote_code or team.allow_trust_remote_code
    for role in ("weak", "strong"):
        model = getattr(spec, role)
        if model.trust_remote_code and not allowed:
            errors.append(
                (
                    f"{role}.trust_remote_code",
                    "running model code from the hub is off for your team; ask an admin",
                )
            )
        elif not model.trust_remote_code and _runs_model_code(model.model):
            fix = f"set {role}.trust_remote_code to true" if allowed else "ask an admin to allow it"
            errors.append(
                (
                    f"{role}.model",
                    f"{model.model!r} has auto_map in its config: loading it runs Python code from the "
                    f"directory (trust_remote_code), which is off for this job; {fix}",
                )
            )
    if errors:
        raise SpecError(errors)
    return spec


def dataset_label(spec: JobSpec) -> str:
    name = spec.dataset.name
    return name if isinstance(name, str) else Path(name.path).name


def create_job(
    session: Session,
    *,
    team: Team,
    spec: JobSpec,
    name: str = "",
    priority: int = 0,
    idempotency_key: str | None = None,
    sweep_id: str | None = None,
) -> tuple[Job, bool]:
    """Create a queued job and its pending stages. With an idempotency key that the team used
    before, return that job instead; the bool says whether a job was created."""
    if idempotency_key:
        existing = session.scalar(
            select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return existing, False
    job = Job(
        team_id=team.id,
        sweep_id=sweep_id,
        name=name,
        priority=priority,
        spec=spec.model_dump(mode="json"),
        dataset=dataset_label(spec),
        weak_model=spec.weak.model,
        strong_model=spec.strong.model,
        idempotency_key=idempotency_key,
        status=JobStatus.queued,
    )
    by_kind_seed: dict[tuple[str, int], Stage] = {}
    for template in expand_stages(spec):
        # Ids are set here, not at flush, so students can point at their weak stage right away.
        stage = Stage(
            id=new_id(),
            kind=template.kind,
            seed=template.seed,
            order=template.order,
            status=StageStatus.pending,
        )
        if template.depends_on_kind:
            stage.depends_on_id = by_kind_seed[template.depends_on_kind, template.seed].id
        by_kind_seed[template.kind, template.seed] = stage
        job.stages.append(stage)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # Two requests with the same idempotency key raced; the other one won.
        session.rollback()
        existing = session.scalar(
            select(Job).where(Job.team_id == team.id, Job.idempotency_key == idempotency_key)
        )
        if existing is None:
            raise
        return existing, False
    log(session, job_id=job.id, message=f"job created with {len(job.stages)} stages")
    return job, True


# The read path of the API (GET /v1/jobs/{id} and GET /v1/jobs) uses Core statements of just the columns
# it shows, built once: ORM objects, and rebuilding statements per call, cost more CPU than the queries.
_STAGE_DONE = (StageStatus.succeeded, StageStatus.cached)
_JOB_DETAIL = select(
    Job.id,
    Job.name,
    Job.status,
    Job.priority,
    Job.error,
    Job.dataset,
    Job.weak_model,
    Job.strong_model,
    Job.sweep_id,
    Job.spec,
    Job.results,
    Job.gpu_seconds,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
).where(Job.id == bindparam("job_id"), Job.team_id == bindparam("team_id"))
_STAGE_DETAIL = (
    select(
        Stage.id,
        Stage.kind,
        Stage.seed,
        Stage.status,
        Stage.attempts,
        Stage.stage_key,
        Stage.gpu_class,
        Stage.memory_gb,
        Stage.worker,
        Stage.gpu,
        Stage.step,
        Stage.total_steps,
        Stage.metrics,
        Stage.error,
        Stage.gpu_seconds,
        Stage.queued_at,
        Stage.started_at,
        Stage.finished_at,
    )
    .where(Stage.job_id == bindparam("job_id"))
    .order_by(Stage.order)
)
# Per listed job, its stage count and finished stages: subqueries run for the page's rows only.
_N_STAGES = select(func.count()).where(Stage.job_id == Job.id).correlate(Job).scalar_subquery()
_N_DONE = (
    select(func.count())
    .where(Stage.job_id == Job.id, Stage.status.in_(_STAGE_DONE))
    .correlate(Job)
    .scalar_subquery()
)
_JOB_SUMMARIES = select(
    Job.id,
    Job.name,
    Job.status,
    Job.priority,
    Job.dataset,
    Job.weak_model,
    Job.strong_model,
    Job.created_at,
    Job.finished_at,
    _N_STAGES.label("n_stages"),
    _N_DONE.label("n_done"),
)


@dataclass(frozen=True)
class JobDetail:
    """A job's public columns and its stages in run order, as rows (attribute access, like a Job)."""

    job: Row[Any]
    stages: Sequence[Row[Any]]


def job_detail(session: Session, *, team_id: str, job_id: str) -> JobDetail:
    """What GET /v1/jobs/{id} shows, without loading ORM objects (see get_job for those)."""
    connection = session.connection()  # Core on the session's connection: no ORM bookkeeping
    job = connection.execute(_JOB_DETAIL, {"job_id": job_id, "team_id": team_id}).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return JobDetail(job=job, stages=connection.execute(_STAGE_DETAIL, {"job_id": job_id}).all())


def get_job(session: Session, *, team_id: str, job_id: str) -> Job:
    # One job's few stages come in the same round trip (a join), not a second query.
    job = (
        session.scalars(
            select(Job).options(joinedload(Job.stages)).where(Job.id == job_id, Job.team_id == team_id)
        )
        .unique()
        .first()
    )
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def encode_cursor(job: Job | Row[Any]) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return dt.datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "cursor: not a cursor from a previous page; omit it to start at the first page"
        ) from error


def list_jobs(
    session: Session,
    *,
    team_id: str,
    status: str | None = None,
    dataset: str | None = None,
    model: str | None = None,
    name: str | None = None,
    sweep_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id): deep pages cost what the first does."""
    query, params = _listing(
        "jobs",
        team_id=team_id,
        status=status,
        dataset=dataset,
        model=model,
        name=name,
        sweep_id=sweep_id,
        limit=limit,
        cursor=cursor,
    )
    return _page(session.scalars(query, params).all(), limit)


def list_job_summaries(
    session: Session,
    *,
    team_id: str,
    status: str | None = None,
    dataset: str | None = None,
    model: str | None = None,
    name: str | None = None,
    sweep_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Row[Any]], str | None]:
    """list_jobs as rows of the summary columns plus ``n_stages`` and ``n_done`` (finished stages),
    in one statement and without ORM objects: what GET /v1/jobs shows."""
    query, params = _listing(
        "summaries",
        team_id=team_id,
        status=status,
        dataset=dataset,
        model=model,
        name=name,
        sweep_id=sweep_id,
        limit=limit,
        cursor=cursor,
    )
    return _page(session.connection().execute(query, params).all(), limit)


def _listing(
    kind: str,
    *,
    team_id: str,
    status: str | None,
    dataset: str | None,
    model: str | None,
    name: str | None,
    sweep_id: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[Select[Any], dict[str, Any]]:
    """A listing's statement and the values of its parameters."""
    # One more than a page: whether it comes back says whether there is a next page.
    params: dict[str, Any] = {"team_id": team_id, "limit": limit + 1}
    if status:
        params["status"] = JobStatus(status)
    if dataset:
        params["dataset"] = dataset
    if model:
        params["model"] = model
    if name:
        params["name"] = "%" + name.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"
    if sweep_id:
        params["sweep_id"] = sweep_id
    if cursor:
        params["cursor_created"], params["cursor_id"] = decode_cursor(cursor)
    return _listing_query(kind, frozenset(params)), params


@cache
def _listing_query(kind: str, bound: frozenset[str]) -> Select[Any]:
    """The statement of a listing of ``kind`` (jobs | summaries) filtered on the parameters in ``bound``:
    built once per combination, so SQLAlchemy reuses its compiled form and result metadata (a fresh
    statement per call costs more CPU than the query itself)."""
    if kind == "jobs":
        # ORM jobs for summaries: the large JSON documents (spec, results, manifest, stage results)
        # stay in the database unless a caller touches them, which then loads them lazily.
        query = select(Job).options(
            defer(Job.spec),
            defer(Job.results),
            defer(Job.manifest),
            selectinload(Job.stages).defer(Stage.result).defer(Stage.metrics),
        )
    else:
        query = _JOB_SUMMARIES
    query = query.where(Job.team_id == bindparam("team_id"))
    if "status" in bound:
        query = query.where(Job.status == bindparam("status"))
    if "dataset" in bound:
        query = query.where(Job.dataset == bindparam("dataset"))
    if "model" in bound:
        model = bindparam("model")
        query = query.where(or_(Job.weak_model == model, Job.strong_model == model))
    if "name" in bound:
        # A substring: the value arrives as a LIKE pattern with %, _ and / escaped by "/".
        query = query.where(Job.name.like(bindparam("name"), escape="/"))
    if "sweep_id" in bound:
        query = query.where(Job.sweep_id == bindparam("sweep_id"))
    if "cursor_id" in bound:
        # A row comparison, not an OR: the index on (team_id, created_at, id) then seeks straight to
        # the cursor, so a deep page costs what the first does.
        after = tuple_(
            bindparam("cursor_created", type_=Job.created_at.type), bindparam("cursor_id", type_=Job.id.type)
        )
        query = query.where(tuple_(Job.created_at, Job.id) < after)
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(bindparam("limit"))


def _page(rows: Sequence[Any], limit: int) -> tuple[list[Any], str | None]:
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return list(rows[:limit]), next_cursor


def cancel_job(session: Session, *, job: Job) -> Job:
    """Cancel now: pending and queued stages stop here; running ones stop at their next step."""
    check_job_transition(job.status, JobStatus.cancelled)
    job.status = JobStatus.cancelled
    job.cancel_requested = True
    job.finished_at = utcnow()
    for stage in job.stages:
        if stage.status in (StageStatus.pending, StageStatus.queued):
            check_stage_transition(stage.status, StageStatus.cancelled)
            stage.status = StageStatus.cancelled
            stage.finished_at = utcnow()
    log(session, job_id=job.id, message="cancel requested")
    return job


def retry_job(session: Session, *, job: Job) -> Job:
    """Run the failed and cancelled stages of a failed or cancelled job again."""
    check_job_transition(job.status, JobStatus.queued)
    job.status = JobStatus.queued
    job.cancel_requested = False
    job.error = None
    job.finished_at = None
    job.results = None
    for stage in job.stages:
        if stage.status in (StageStatus.failed, StageStatus.cancelled):
            check_stage_transition(stage.status, StageStatus.pending)
            stage.status = StageStatus.pending
            stage.attempts = 0
            stage.error = None
            stage.finished_at = None
    log(session, job_id=job.id, message="retry requested")
    return job


def log(
    session: Session, *, job_id: str, message: str, stage_id: str | None = None, level: str = "info"
) -> None:
    session.add(LogLine(job_id=job_id, stage_id=stage_id, message=message, level=level))


def job_logs(session: Session, *, job: Job, after_id: int = 0, limit: int = 1000) -> list[LogLine]:
    query = select(LogLine).where(LogLine.job_id == job.id, LogLine.id > after_id).order_by(LogLine.id)
    return list(session.scalars(query.limit(limit)))
