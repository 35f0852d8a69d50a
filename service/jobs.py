"""Job service functions: create, list, read, cancel, retry. They take keyword arguments, raise the
errors of :mod:`service.errors` (and spec errors) a caller can show, and know nothing of HTTP.
Status changes go through :mod:`service.lifecycle`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Row, Select, bindparam, func, insert, or_, select, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, joinedload, selectinload

from service import lifecycle, limits
from service.availability import availability_errors
from service.errors import Conflict, InvalidInput, NotFound
from service.lifecycle import log
from service.models import Dataset, Job, LogLine, Stage, StageEvent, Team, new_id, utcnow
from service.pagination import decode_cursor, page
from service.paths import model_reference, resolve_under
from service.planning import UPLOAD_PREFIX
from service.settings import Settings, get_settings
from service.states import STAGE_BACKLOG, STAGE_DONE, STAGE_UNFINISHED, JobStatus, can_retry
from service.storage import check_storage
from w2s.model_store import is_store_model, store_digest
from w2s.spec import JobSpec, SpecError, is_local_model_name, parse_spec

__all__ = ["UPLOAD_PREFIX", "NotFound", "log"]

# The stages a retry moves back to pending that were not counted in the team's backlog already.
REVIVED_BY_RETRY = sorted(str(status) for status in STAGE_UNFINISHED - STAGE_BACKLOG)


@dataclass(frozen=True)
class StageTemplate:
    kind: str
    seed: int
    order: int
    depends_on_kind: str | None  # students need the weak stage of their seed


def expand_stages(spec: JobSpec) -> list[StageTemplate]:
    """The stages of a job in run order: per seed, the library's layout (w2s.stages.stage_layout)."""
    from w2s.stages import stage_layout

    layout = stage_layout(spec)
    templates: list[StageTemplate] = []
    for seed in spec.seeds:
        for slot in layout:
            templates.append(StageTemplate(slot.kind, seed, len(templates), slot.supervisor))
    return templates


def _raw_models(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each model entry of a raw spec with the field that holds it (weak, strong, chain.0, ...); a
    chain's bare model ids become entries here, so later rewrites apply to them too."""
    entries = [(role, raw.get(role)) for role in ("weak", "strong")]
    chain = raw.get("chain")
    if isinstance(chain, list):
        chain[:] = [{"model": item} if isinstance(item, str) else item for item in chain]
        entries += [(f"chain.{i}", item) for i, item in enumerate(chain)]
    return [(field, entry) for field, entry in entries if isinstance(entry, dict)]


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


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec checked for a team: ``spec`` as the library reads it, ``stored`` as the job keeps it
    (an upload stays ``upload:<id>``: no server path ever appears in a job)."""

    spec: JobSpec
    stored: dict[str, Any]


def _resolve_models(raw: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """Rewrite each model of ``raw`` as the policy resolves it (service/paths.py: a hub id, or an
    absolute directory under the model roots, so that every worker loads the same thing); the
    refused ones as (field, message), worded the same whether or not the path exists."""
    errors = []
    for role, entry in _raw_models(raw):
        model = entry.get("model")
        if not isinstance(model, str):
            continue  # the spec's own validation names it
        if is_store_model(model):
            try:
                store_digest(model)
            except ValueError as error:
                errors.append((f"{role}.model", str(error).removeprefix("model: ")))
            continue  # the same bytes wherever it is fetched; availability checks its manifest
        reference = model_reference(model, settings.model_roots, settings.path_base)
        if reference is None:
            where = ", ".join(str(root) for root in settings.model_roots) or "(none configured)"
            errors.append(
                (
                    f"{role}.model",
                    f"a model is a Hugging Face hub id (such as 'gpt2' or 'org/name'), a model pushed "
                    "into the artifact store ('store:<hash>', from `w2s-service models push DIR`) or a "
                    f"directory under the model roots: {where}; ask an admin to add a model there "
                    "(W2S_MODEL_ROOTS)",
                )
            )
        else:
            entry["model"] = reference.value
    return errors


def _resolve_data_paths(raw: dict[str, Any], roots: list[Path], base: Path) -> list[tuple[str, str]]:
    """Rewrite a custom dataset's files as absolute paths under ``roots`` (the team's uploads and the
    data directory); the refused ones as (field, message)."""
    dataset = raw.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else None
    if not isinstance(name, dict):
        return []
    errors = []
    for field in ("path", "test_path"):
        value = name.get(field)
        if not isinstance(value, str):
            continue
        resolved = resolve_under(value, roots, base)
        if resolved is None:
            errors.append(
                (
                    f"dataset.name.{field}",
                    f"{value!r} is outside the allowed data directories; "
                    "upload the file with POST /v1/datasets and use its id as 'upload:<id>'",
                )
            )
        else:
            name[field] = str(resolved)
    return errors


def _count(value: Any, default: int) -> int:
    return len(value) if isinstance(value, list) else default


def check_size_first(
    team: Team, settings: Settings, raw: dict[str, Any], *, pairs: int = 1, what: str = "job"
) -> None:
    """Refuse an oversized job or sweep by arithmetic on the raw spec's list lengths (losses, seeds,
    chain, model pairs), before any model, loss or dataset is resolved: a refusal costs microseconds
    however large the request. Lists longer than a spec allows, or malformed, are left to the
    validation, which names their field."""
    from w2s.spec import MAX_CHAIN, MAX_LOSSES, MAX_SEEDS
    from w2s.stages import stages_per_seed

    losses, seeds = _count(raw.get("losses"), 1), _count(raw.get("seeds"), 1)
    chain = _count(raw.get("chain"), 0)
    if losses > MAX_LOSSES or seeds > MAX_SEEDS or chain > MAX_CHAIN:
        return
    limits.check_job_size(team, settings, pairs * seeds * stages_per_seed(losses, chain), what=what)


def resolve_spec(session: Session, *, team: Team, raw: dict[str, Any], settings: Settings) -> ResolvedSpec:
    """Validate a spec for ``team``: models from known places, uploaded datasets by id, file paths
    only inside the data directory, and ``trust_remote_code`` only where an admin allowed it."""
    raw = json.loads(json.dumps(raw))  # a private copy: we rewrite the dataset reference below
    model_errors = _resolve_models(raw, settings)
    if model_errors:
        raise SpecError(model_errors)
    errors: list[tuple[str, str]] = []
    dataset = raw.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else None
    upload_name = None
    if isinstance(name, str) and name.startswith(UPLOAD_PREFIX):
        upload = session.get(Dataset, name.removeprefix(UPLOAD_PREFIX))
        if upload is None or upload.team_id != team.id:
            raise SpecError(
                [("dataset.name", f"no uploaded dataset {name!r}; list yours with GET /v1/datasets")]
            )
        upload_name = name
        # Its bytes are in the artifact store (service/upload_files.py): nothing on this host to check.
        dataset["name"] = {
            "path": name,
            "text": upload.text_column,
            "label": upload.label_column,
            "format": upload.format,
        }
    else:
        # Other files only under the data directory (and a team's own uploads kept on disk before
        # uploads were stored): another team's files are outside, like any other path.
        data_roots = [settings.uploads_dir / team.id] + ([settings.data_dir] if settings.data_dir else [])
        errors += _resolve_data_paths(raw, data_roots, settings.path_base)
    spec = parse_spec(raw)
    allowed = settings.allow_trust_remote_code or team.allow_trust_remote_code
    for role, model in spec.named_models():
        if model.trust_remote_code and not allowed:
            errors.append(
                (
                    f"{role}.trust_remote_code",
                    "running model code from the hub is off for your team; ask an admin",
                )
            )
        elif (
            not model.trust_remote_code and Path(model.model).is_absolute() and _runs_model_code(model.model)
        ):
            fix = f"set {role}.trust_remote_code to true" if allowed else "ask an admin to allow it"
            errors.append(
                (
                    f"{role}.model",
                    f"{model.model!r} has auto_map in its config: loading it runs Python code from the "
                    f"directory (trust_remote_code), which is off for this job; {fix}",
                )
            )
    if not errors:
        errors = availability_errors(spec, settings)
    if errors:
        raise SpecError(errors)
    stored = spec.model_dump(mode="json")
    if upload_name is not None:
        stored["dataset"]["name"] = upload_name
    return ResolvedSpec(spec, stored)


def attempt_policy_errors(session: Session, job_id: str, settings: Settings) -> list[str]:
    """Today's rules for a job about to run a stage (checked at every claim, not only at submission):
    its team is enabled, its models are still under the model roots, and running model code is
    still allowed where it asks for it. Empty when the stage may run."""
    row = session.execute(
        select(Job.spec, Team.disabled_at, Team.allow_trust_remote_code)
        .join(Team, Team.id == Job.team_id)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        return ["the job no longer exists"]
    spec, disabled_at, team_allows_code = row
    if disabled_at is not None:
        return ["your team was disabled by an administrator"]
    errors = []
    allowed = settings.allow_trust_remote_code or team_allows_code
    models = [("weak", spec.get("weak")), ("strong", spec.get("strong"))]
    models += [(f"chain.{i}", entry) for i, entry in enumerate(spec.get("chain") or [])]
    for role, entry in models:
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            continue
        if entry.get("trust_remote_code") and not allowed:
            errors.append(f"{role}.trust_remote_code: running model code is no longer allowed for your team")
        model = entry["model"]
        if (
            is_local_model_name(model)
            and resolve_under(model, settings.model_roots, settings.path_base) is None
        ):
            errors.append(f"{role}.model: {model!r} is no longer under the model roots (W2S_MODEL_ROOTS)")
    return errors


def dataset_label(stored: dict[str, Any]) -> str:
    name = stored["dataset"]["name"]
    return name if isinstance(name, str) else Path(name["path"]).name


def request_hash(body: Any) -> str:
    """What identifies a request's body for Idempotency-Key checks: its canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def create_job(
    session: Session,
    *,
    team: Team,
    resolved: ResolvedSpec,
    settings: Settings,
    name: str = "",
    priority: int = 0,
    stage_time_limit_s: int | None = None,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
    sweep_id: str | None = None,
    sweep_position: tuple[int, int] | None = None,
    check_backlog: bool = True,
) -> tuple[Job, bool]:
    """Create a queued job and its pending stages, within the team's limits. With an idempotency key
    that the team used before, return that job instead (the bool says whether a job was created);
    the same key with a different body is refused. A sweep's job gets ``sweep_position``: the
    indexes of its weak and strong entries in the sweep's grid."""
    if idempotency_key:
        existing = job_for_idempotency_key(session, team, idempotency_key, body_hash)
        if existing is not None:
            return existing, False
    spec = resolved.spec
    templates = expand_stages(spec)
    limits.check_priority(team, settings, priority)
    limits.check_stage_time_limit(team, settings, stage_time_limit_s)
    if sweep_id is None:
        limits.check_job_size(team, settings, len(templates))
    if check_backlog:  # a sweep checks these once for all its jobs
        limits.check_backlog(session, team, settings, len(templates))
        check_storage(session, team, settings, what="a new job")
    job = Job(
        id=new_id(),
        team_id=team.id,
        sweep_id=sweep_id,
        sweep_weak_index=sweep_position[0] if sweep_position else None,
        sweep_strong_index=sweep_position[1] if sweep_position else None,
        name=name,
        priority=priority,
        stage_time_limit_s=stage_time_limit_s,
        spec=resolved.stored,
        dataset=dataset_label(resolved.stored),
        weak_model=spec.weak.model,
        strong_model=spec.strong.model,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        stages_left=len(templates),
        created_at=utcnow(),
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # Two requests with the same idempotency key raced; the other one won.
        session.rollback()
        existing = _job_for_key(session, team, idempotency_key, body_hash) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    # One multi-row INSERT, not an ORM object per stage: a sweep may add tens of thousands.
    ids: dict[tuple[str, int], str] = {}
    rows = []
    for template in templates:
        ids[template.kind, template.seed] = stage_id = new_id()
        depends_on = ids[template.depends_on_kind, template.seed] if template.depends_on_kind else None
        rows.append(
            {
                "id": stage_id,
                "job_id": job.id,
                "kind": template.kind,
                "seed": template.seed,
                "order": template.order,
                "depends_on_id": depends_on,
                "team_id": team.id,
                "priority": priority,
                "job_created_at": job.created_at,
            }
        )
    session.execute(insert(Stage), rows)
    log(session, job_id=job.id, message=f"job created with {len(rows)} stages")
    return job, True


class IdempotencyKeyBusy(Conflict):
    """Another request is creating a job with this Idempotency-Key right now (409, Retry-After)."""


def claim_idempotency_key(session: Session, team_id: str, key: str) -> None:
    """Only one request at a time may create a job for a team's key: it holds a lock on the key until
    its transaction ends, and a repeat that arrives meanwhile is told at once to come back (409 with
    Retry-After) instead of waiting on the first one's insert, which held a connection and a
    thread per waiter. After the first commits, a repeat finds its job. (SQLite: its write lock
    already serialises creators.)"""
    if session.get_bind().dialect.name != "postgresql":
        return
    held = session.scalar(
        text("SELECT pg_try_advisory_xact_lock(hashtextextended(:name, 0))"),
        {"name": f"w2s:idempotency:{team_id}:{key}"},
    )
    if not held:
        raise IdempotencyKeyBusy(
            f"a request with Idempotency-Key {key!r} is being processed right now; send it again in a "
            "second to get its job",
            retry_after_s=1,
        )


def job_for_idempotency_key(session: Session, team: Team, key: str, body_hash: str | None) -> Job | None:
    """The job a team's Idempotency-Key already created, or None, with the key claimed for this
    transaction (:func:`claim_idempotency_key`: IdempotencyKeyBusy while another request holds it)."""
    claim_idempotency_key(session, team.id, key)
    return _job_for_key(session, team, key, body_hash)


def _job_for_key(session: Session, team: Team, key: str, body_hash: str | None) -> Job | None:
    existing = session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))
    if existing is not None and body_hash and existing.request_hash and existing.request_hash != body_hash:
        raise InvalidInput(
            f"Idempotency-Key {key!r} was used for job {existing.id} with a different body; use a new key "
            "for a new job, or send the same body to get that job back"
        )
    return existing


# The read path of the API (GET /v1/jobs/{id} and GET /v1/jobs) uses Core statements of just the columns
# it shows, built once: ORM objects, and rebuilding statements per call, cost more CPU than the queries.
_JOB_DETAIL = select(
    Job.id,
    Job.name,
    Job.status,
    Job.priority,
    Job.stage_time_limit_s,
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
        Stage.checkpoint_step,
        Stage.preemptions,
        Stage.yield_requested_at,
    )
    .where(Stage.job_id == bindparam("job_id"))
    .order_by(Stage.order)
)
# Per listed job, its stage count and finished stages: subqueries run for the page's rows only.
_N_STAGES = select(func.count()).where(Stage.job_id == Job.id).correlate(Job).scalar_subquery()
_N_DONE = (
    select(func.count())
    .where(Stage.job_id == Job.id, Stage.status.in_([str(status) for status in STAGE_DONE]))
    .correlate(Job)
    .scalar_subquery()
)
_JOB_SUMMARIES = select(
    Job.id,
    Job.team_id,
    Job.name,
    Job.status,
    Job.priority,
    Job.dataset,
    Job.weak_model,
    Job.strong_model,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    _N_STAGES.label("n_stages"),
    _N_DONE.label("n_done"),
)


@dataclass(frozen=True)
class JobDetail:
    """A job's public columns and its stages in run order, as rows (attribute access, like a Job)."""

    job: Row[Any]
    stages: Sequence[Row[Any]]
    events: dict[str, list[Row[Any]]]


def job_detail(session: Session, *, team_id: str, job_id: str) -> JobDetail:
    """What GET /v1/jobs/{id} shows, without loading ORM objects (see get_job for those)."""
    connection = session.connection()  # Core on the session's connection: no ORM bookkeeping
    job = connection.execute(_JOB_DETAIL, {"job_id": job_id, "team_id": team_id}).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    stages = connection.execute(_STAGE_DETAIL, {"job_id": job_id}).all()
    return JobDetail(job=job, stages=stages, events=stage_events(session, [stage.id for stage in stages]))


# A stage's timeline keeps its latest events (a day-long stage writes a checkpoint every 10 minutes).
EVENTS_SHOWN = 100


def stage_events(session: Session, stage_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    """Each stage's timeline events (checkpoints, preemptions, drains, resumes), oldest first: its
    latest EVENTS_SHOWN."""
    if not stage_ids:
        return {}
    events: dict[str, list[Row[Any]]] = {}
    for row in session.execute(
        select(StageEvent.stage_id, StageEvent.at, StageEvent.kind, StageEvent.step, StageEvent.detail)
        .where(StageEvent.stage_id.in_(list(stage_ids)))
        .order_by(StageEvent.id)
    ):
        events.setdefault(row.stage_id, []).append(row)
    return {stage_id: rows[-EVENTS_SHOWN:] for stage_id, rows in events.items()}


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
    return page(session.scalars(query, params).all(), limit)


def list_job_summaries(
    session: Session,
    *,
    team_id: str | None,
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
    return page(session.connection().execute(query, params).all(), limit)


def _listing(
    kind: str,
    *,
    team_id: str | None,
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
    params: dict[str, Any] = {"limit": limit + 1}
    if team_id is not None:  # None: every team's jobs (admins only)
        params["team_id"] = team_id
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
    if "team_id" in bound:
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


def cancel_job(session: Session, *, job: Job) -> Job:
    """Cancel now: pending and queued stages stop here; running ones stop at their next step."""
    lifecycle.cancel_job(session, job.id)
    session.expire_all()  # the lifecycle wrote with conditional statements
    return job


def retry_job(session: Session, *, job: Job, settings: Settings | None = None) -> Job:
    """Run the failed and cancelled stages of a failed or cancelled job again. The stages it revives
    count against the team's backlog (max_queued_stages) like a new job's, under the team's lock."""
    settings = settings or get_settings()
    if can_retry(job.status):  # otherwise the lifecycle answers 409 with the job's state
        # Today's rules, not those of the day it was submitted: models, roots, remote code, data.
        resolve_spec(session, team=job.team, raw=job.spec, settings=settings)
        reviving = session.scalar(
            select(func.count()).where(Stage.job_id == job.id, Stage.status.in_(REVIVED_BY_RETRY))
        )
        limits.check_backlog(session, job.team, settings, int(reviving or 0))
        check_storage(session, job.team, settings, what="retrying this job")
    lifecycle.retry_job(session, job.id)
    session.expire_all()  # the lifecycle wrote with conditional statements
    return job


def job_logs(session: Session, *, job: Job, after_id: int = 0, limit: int = 1000) -> list[LogLine]:
    query = select(LogLine).where(LogLine.job_id == job.id, LogLine.id > after_id).order_by(LogLine.id)
    return list(session.scalars(query.limit(limit)))
