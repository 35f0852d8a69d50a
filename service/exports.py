"""Exports of succeeded jobs to the tracking tools researchers already use (MLflow, Weights & Biases).

An export is a row (``job_exports``), never part of a job: a tracking server that is down or slow
delays the export, not the job. Like the rest of the lifecycle it is level-triggered: a pending
export whose due time has come and that no attempt holds is due (``lease_due_exports``, one per
dispatcher round and batch); each attempt gets a token, and only the attempt holding the current
token may record an outcome (a stale one, whose lease lapsed and was sent again, is fenced out).
A failure waits ``export_retry_s``, doubling up to 30 minutes, and after ``export_max_attempts``
tries the export is failed with its error; ``request_export`` (the API's and the CLI's re-run)
makes it pending again.

Exports run on a queue and worker of their own (``exports``), and the dispatcher leases at most
``exports_per_team`` of one team's exports at once: a team whose tracking server accepts connections
and never answers holds that many export processes until each try times out, and nothing of the
planning or finishing of anyone's jobs.

Where a team's jobs go: the team's own settings (``w2s-service team-set``), else the deployment's
(``W2S_MLFLOW_TRACKING_URI``, ``W2S_WANDB_PROJECT``). Credentials are only ever the *names* of
environment variables on the export workers (``mlflow_token_env``, ``wandb_key_env``): the API
never stores, returns or logs a secret. A name may not be one of the service's own variables
(``reserved_env_reason``): the export would send that secret to the team's server.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput
from service.models import Job, JobExport, Sweep, Team, utcnow
from service.settings import Settings
from service.states import ExportStatus, JobStatus

# A team's export settings (teams columns; w2s-service team-set, PATCH /v1/admin/teams/{id}).
EXPORT_FIELDS = ("mlflow_tracking_uri", "mlflow_token_env", "wandb_project", "wandb_entity", "wandb_key_env")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,99}$")
# The service's own secrets and connections, and the switches of the tracking clients: a team's
# credential may not name one (an operator once named W2S_ADMIN_KEY, and the export sent the admin key
# to the team's server). Prefixes cover every setting (W2S_), the store's cloud credentials and the
# database's and broker's client variables; the names, the usual URLs of both.
RESERVED_ENV_PREFIXES = (
    str(Settings.model_config.get("env_prefix") or "W2S_"),  # every setting (W2S_), secrets included
    "AWS_",  # the artifact store's and data's credentials (the standard AWS chain)
    "AZURE_",
    "GOOGLE_",
    "PG",  # libpq: PGPASSWORD, PGHOST, ...
    "POSTGRES",
    "REDIS",
    "CELERY_",
    "DATABASE",
    "BROKER",
    "HF_",  # the Hugging Face token the workers download with
    "HUGGING_FACE_",
    "MLFLOW_",  # the deployment's own tracking credentials apply without being named
    "WANDB_",
)
RESERVED_ENV_NAMES = frozenset({"SECRET_KEY", "KUBECONFIG", "FLOWER_BASIC_AUTH", "SSH_AUTH_SOCK"})
MLFLOW_SCHEMES = ("http://", "https://", "file:", "databricks")

Target = Literal["mlflow", "wandb"]
TARGETS: tuple[Target, ...] = ("mlflow", "wandb")
MAX_RETRY_WAIT_S = 1800.0


@dataclass(frozen=True)
class Destination:
    """Where one team's job goes in one tracking tool, as the export task needs it."""

    target: Target
    uri: str | None = None  # MLflow tracking URI
    experiment: str | None = None  # MLflow experiment name
    project: str | None = None  # W&B project
    entity: str | None = None  # W&B entity
    group: str | None = None  # W&B group: the sweep, else the job
    secret_env: str | None = None  # the environment variable holding the credential, if any
    # The deployment's own server (W2S_MLFLOW_TRACKING_URI), not one a team was given: only there
    # may the export workers' own MLflow credentials (MLFLOW_TRACKING_TOKEN ...) go.
    deployment_server: bool = True

    @property
    def secret_field(self) -> str:
        """The team's setting that names ``secret_env``."""
        return "mlflow_token_env" if self.target == "mlflow" else "wandb_key_env"


def reserved_env_reason(variable: str) -> str | None:
    """Why ``variable`` may not hold a team's credential (it is one of the service's own), or None."""
    prefix = next((p for p in RESERVED_ENV_PREFIXES if variable.startswith(p)), None)
    if prefix is not None or variable in RESERVED_ENV_NAMES:
        what = f"{prefix}*" if prefix else variable
        return f"{variable} is one of the service's own variables ({what})"
    return None


def check_secret_env(field: str, variable: object) -> None:
    """InvalidInput naming ``field`` unless ``variable`` is the name of a variable that may hold a
    team's credential: a well-formed name, and none of the service's own secrets."""
    if not (isinstance(variable, str) and ENV_NAME.match(variable)):
        raise InvalidInput(
            f"{field}: give the NAME of an environment variable on the export workers that holds "
            "the credential (upper case, digits, underscores, e.g. TEAM_A_WANDB_KEY), never the secret"
        )
    reason = reserved_env_reason(variable)
    if reason is not None:
        raise InvalidInput(
            f"{field}: {reason}; the export would send it to the team's tracking server. Put the "
            "team's own credential in a variable of its own on the export workers (e.g. TEAM_A_MLFLOW_TOKEN) "
            "and name that"
        )


def check_export_fields(changes: dict[str, object]) -> None:
    """Refuse what would leak a secret or never work: a credential must be a variable's name (the
    secret stays in the workers' environment) and not one of the service's own, a tracking URI one
    MLflow's client can use."""
    for name in ("mlflow_token_env", "wandb_key_env"):
        value = changes.get(name)
        if value is not None:
            check_secret_env(name, value)
    uri = changes.get("mlflow_tracking_uri")
    if uri is not None and not (isinstance(uri, str) and uri.startswith(MLFLOW_SCHEMES)):
        raise InvalidInput(
            "mlflow_tracking_uri: an MLflow tracking URI starts with http://, https://, file: or databricks"
        )
    if isinstance(uri, str) and "@" in urlsplit(uri).netloc:
        raise InvalidInput(
            "mlflow_tracking_uri: no user or password in the URI (it is shown to admins and in the audit "
            "log); put a token in a worker environment variable and name it with mlflow_token_env"
        )


def configured_targets(team: Team, settings: Settings) -> list[Target]:
    """The tracking tools the team's jobs are exported to (its own settings, else the deployment's)."""
    targets: list[Target] = []
    if team.mlflow_tracking_uri or settings.mlflow_tracking_uri:
        targets.append("mlflow")
    if team.wandb_project or settings.wandb_project:
        targets.append("wandb")
    return targets


def destination(session: Session, job: Job, target: Target, settings: Settings) -> Destination:
    """Where ``job`` goes in ``target``: the experiment (MLflow) or project and group (W&B)."""
    team = session.get(Team, job.team_id)
    assert team is not None
    sweep = session.get(Sweep, job.sweep_id) if job.sweep_id else None
    if target == "mlflow":
        experiment = f"w2s/{team.name}"
        if settings.export_experiment == "sweep" and sweep is not None:
            experiment += f"/{sweep.name or sweep.id}"
        own = team.mlflow_tracking_uri
        return Destination(
            target,
            uri=own or settings.mlflow_tracking_uri,
            experiment=experiment,
            secret_env=team.mlflow_token_env,
            deployment_server=not own or own == settings.mlflow_tracking_uri,
        )
    return Destination(
        target,
        project=team.wandb_project or settings.wandb_project,
        entity=team.wandb_entity or settings.wandb_entity,
        group=(sweep.name or sweep.id) if sweep is not None else (job.name or job.id),
        secret_env=team.wandb_key_env,
    )


def schedule_exports(session: Session, job: Job, settings: Settings) -> list[JobExport]:
    """Pending exports for a job that has just succeeded, one per configured tool (in the job's own
    transaction: a job never succeeds without its exports recorded)."""
    team = session.get(Team, job.team_id)
    assert team is not None
    return [_pending(session, job, target) for target in configured_targets(team, settings)]


def request_export(session: Session, job: Job, target: str, settings: Settings) -> JobExport:
    """Export ``job`` to ``target`` now, or again: the export is pending and due at once, its tries
    counted afresh. Only a succeeded job has results to export."""
    if target not in TARGETS:
        raise InvalidInput(f"to: no tracking tool {target!r}; choose mlflow or wandb")
    if job.status != JobStatus.succeeded:
        raise Conflict(f"job {job.id} is {job.status}: only a succeeded job has results to export")
    team = session.get(Team, job.team_id)
    assert team is not None
    if target not in configured_targets(team, settings):
        setting = "W2S_MLFLOW_TRACKING_URI" if target == "mlflow" else "W2S_WANDB_PROJECT"
        option = "--mlflow-uri" if target == "mlflow" else "--wandb-project"
        raise InvalidInput(
            f"to: no {target} destination is configured for this team; an operator sets {setting} "
            f"(every team) or `w2s-service team-set {team.name} {option} ...` (this team)"
        )
    return _pending(session, job, target)  # type: ignore[arg-type]


def _pending(session: Session, job: Job, target: Target) -> JobExport:
    now = utcnow()
    export = session.scalar(
        select(JobExport).where(JobExport.job_id == job.id, JobExport.target == target).with_for_update()
    )
    if export is None:
        export = JobExport(job_id=job.id, team_id=job.team_id, target=target, created_at=now)
        session.add(export)
    # A new token fences out an attempt still running from before.
    export.status, export.attempts, export.due_at, export.updated_at = ExportStatus.pending, 0, now, now
    export.lease_until, export.token, export.error, export.finished_at = None, None, None, None
    session.flush()
    return export


def lease_due_exports(session: Session, settings: Settings, limit: int) -> list[tuple[str, str]]:
    """Leases the exports that are due (oldest first) and returns (export id, token) to send; an
    export whose tries are spent is failed instead, with its last error.

    A team has at most ``exports_per_team`` exports in flight (leased, lease not lapsed): its due
    exports beyond that wait for one of its own to end, and other teams' due exports go ahead of
    them, so fifty exports to one dead server hold that many export processes and no more. Nothing
    sorts the backlog: the teams at their cap are left out, the oldest due rows of the others are
    read in the index's order, and each team takes its free slots of them (a team that fills the
    window is at its cap in the next round, so the others' turn comes)."""
    now = utcnow()
    cap = settings.exports_per_team
    in_flight: dict[str, int] = dict(
        session.execute(
            select(JobExport.team_id, func.count())
            .where(
                JobExport.status == ExportStatus.pending,
                JobExport.token.is_not(None),
                JobExport.lease_until >= now,
            )
            .group_by(JobExport.team_id)
        ).all()
    )
    is_due = [
        JobExport.status == ExportStatus.pending,
        JobExport.due_at <= now,
        or_(JobExport.lease_until.is_(None), JobExport.lease_until < now),
    ]
    at_cap = [team_id for team_id, count in in_flight.items() if count >= cap]
    if at_cap:
        is_due.append(JobExport.team_id.not_in(at_cap))
    due = session.execute(
        select(JobExport.id, JobExport.team_id, JobExport.attempts, JobExport.error)
        .where(*is_due)
        .order_by(JobExport.due_at)  # the index's order (ix_job_exports_due): no sort
        .limit(limit * cap)
        .with_for_update(skip_locked=True)
    ).all()
    leased: list[tuple[str, str]] = []
    for export_id, team_id, attempts, error in due:
        if attempts >= settings.export_max_attempts:  # failed, not sent: it takes no slot
            last = error or "its task was lost each time (the exports worker's log says why)"
            session.execute(
                update(JobExport)
                .where(JobExport.id == export_id)
                .values(
                    status=ExportStatus.failed,
                    error=f"gave up after {attempts} tries: {last}",
                    lease_until=None,
                    token=None,
                    updated_at=now,
                    finished_at=now,
                )
            )
            continue
        if len(leased) >= limit or in_flight.get(team_id, 0) >= cap:
            continue  # its turn comes in a later round
        in_flight[team_id] = in_flight.get(team_id, 0) + 1
        token = uuid.uuid4().hex
        session.execute(
            update(JobExport)
            .where(JobExport.id == export_id)
            .values(
                attempts=attempts + 1,
                token=token,
                lease_until=now + dt.timedelta(seconds=settings.export_lease_s),
                updated_at=now,
            )
        )
        leased.append((export_id, token))
    return leased


def export_succeeded(
    session: Session, export_id: str, token: str, *, run_id: str, run_url: str | None
) -> bool:
    """Record where the job now is; False if this attempt was fenced out (its outcome is dropped)."""
    now = utcnow()
    done = session.execute(
        update(JobExport)
        .where(JobExport.id == export_id, JobExport.token == token, JobExport.status == ExportStatus.pending)
        .values(
            status=ExportStatus.succeeded,
            run_id=run_id,
            run_url=run_url,
            error=None,
            lease_until=None,
            updated_at=now,
            finished_at=now,
        )
    )
    return bool(done.rowcount)


def export_failed(
    session: Session, export_id: str, token: str, error: str, settings: Settings, *, final: bool = False
) -> bool:
    """This try failed: wait (doubling from export_retry_s, at most 30 min) and try again, unless
    the tries are spent, or the failure is ``final`` (trying again cannot help: the export fails now
    with ``error``). False if this attempt was fenced out."""
    export = session.scalar(select(JobExport).where(JobExport.id == export_id).with_for_update())
    if export is None or export.token != token or export.status != ExportStatus.pending:
        return False
    now = utcnow()
    # The token goes too: a duplicate of this try's message cannot run it again before its time.
    export.error, export.updated_at, export.lease_until, export.token = error[:4000], now, None, None
    if final:
        export.status, export.finished_at = ExportStatus.failed, now
    elif export.attempts >= settings.export_max_attempts:
        export.status, export.finished_at = ExportStatus.failed, now
        export.error = f"gave up after {export.attempts} tries: {error}"[:4000]
    else:
        wait = min(settings.export_retry_s * 2 ** (export.attempts - 1), MAX_RETRY_WAIT_S)
        export.due_at = now + dt.timedelta(seconds=wait)
    return True


def current_export(session: Session, export_id: str, token: str) -> JobExport | None:
    """The export if ``token`` still holds it."""
    export = session.get(JobExport, export_id)
    if export is None or export.token != token or export.status != ExportStatus.pending:
        return None
    return export


def job_exports(session: Session, job_id: str) -> list[JobExport]:
    return list(
        session.scalars(select(JobExport).where(JobExport.job_id == job_id).order_by(JobExport.target))
    )
