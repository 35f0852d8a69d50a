"""What an administrator can do: see and change teams (weight, quota, priority ceiling, limits),
disable and enable them, list and revoke keys, see and cancel any job. Every action is written to
the audit log with who did it and with which values."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import lifecycle
from service.auth import KEY_CACHE, create_api_key, create_team, revoke_api_key
from service.errors import InvalidInput, NotFound
from service.exports import EXPORT_FIELDS, check_export_fields
from service.models import ApiKey, AuditEntry, Job, Team, utcnow
from service.states import JobStatus
from service.team_names import team_name_key
from w2s.safe_text import check_name

# What PATCH /v1/admin/teams/{id} may change.
TEAM_FIELDS = (
    "weight",
    "gpu_quota",
    "allow_trust_remote_code",
    "max_priority",
    "max_queued_stages",
    "max_stages_per_job",
    "max_stages_per_sweep",
    "upload_quota_mb",
    "max_uploads",
    "storage_quota_mb",
    "stage_time_limit_s",
    "requests_per_minute",
    "max_streams_per_team",
    *EXPORT_FIELDS,
)
ADMIN = "admin"


def audit(
    session: Session, *, action: str, target: str, details: dict[str, Any] | None = None, actor: str = ADMIN
) -> None:
    session.add(AuditEntry(actor=actor, action=action, target=target, details=details))


def team_by_id(session: Session, team_id: str) -> Team:
    team = session.get(Team, team_id)
    if team is None:
        raise NotFound(f"team {team_id} not found")
    return team


def team_by_name_or_id(session: Session, name_or_id: str) -> Team:
    """A team by its exact name, its id, or its name as uniqueness compares names ("ALPHA" finds
    "alpha"), in that order of preference."""
    found = session.scalars(
        select(Team).where(
            (Team.name == name_or_id) | (Team.id == name_or_id) | (Team.name_key == team_name_key(name_or_id))
        )
    ).all()
    if not found:
        raise NotFound(f"no team named {name_or_id!r}; list them with `w2s-service teams`")
    return min(found, key=lambda team: (team.name != name_or_id, team.id != name_or_id))


def new_team(session: Session, *, actor: str = ADMIN, **fields: Any) -> tuple[Team, str]:
    """A team and its first key (returned once)."""
    team = create_team(session, **fields)
    _, key = create_api_key(session, team=team, name="first key")
    audit(session, actor=actor, action="create_team", target=team.id, details={"name": team.name, **fields})
    return team, key


def check_names(fields: dict[str, Any]) -> None:
    """InvalidInput naming the field when a name given here holds control, bidi or invisible
    characters (the API's schemas check the same; the admin CLI comes in here directly)."""
    for field, value in fields.items():
        if isinstance(value, str):
            try:
                check_name(value, field)
            except ValueError as error:
                raise InvalidInput(str(error)) from None


def new_key(session: Session, *, team: Team, name: str = "", actor: str = ADMIN) -> tuple[ApiKey, str]:
    check_names({"name": name})
    row, key = create_api_key(session, team=team, name=name)
    audit(session, actor=actor, action="create_key", target=team.id, details={"key_id": row.id, "name": name})
    return row, key


def list_teams(session: Session) -> list[Team]:
    return list(session.scalars(select(Team).order_by(Team.name)))


def update_team(session: Session, *, team: Team, changes: dict[str, Any], actor: str = ADMIN) -> Team:
    unknown = set(changes) - set(TEAM_FIELDS)
    if unknown:
        raise InvalidInput(f"cannot change {', '.join(sorted(unknown))}; allowed: {', '.join(TEAM_FIELDS)}")
    check_names(changes)
    check_export_fields(changes)
    for name, value in changes.items():
        setattr(team, name, value)
    audit(session, actor=actor, action="update_team", target=team.id, details=changes)
    KEY_CACHE.forget(team_id=team.id)  # a changed rate limit applies at once in this process
    return team


def set_team_disabled(session: Session, *, team: Team, disabled: bool, actor: str = ADMIN) -> int:
    """Disable (its keys and sessions stop working; its open jobs are cancelled) or enable a team.
    Returns how many jobs were cancelled."""
    cancelled = 0
    if disabled and team.disabled_at is None:
        team.disabled_at = utcnow()
        open_jobs = session.scalars(
            select(Job.id).where(
                Job.team_id == team.id, Job.status.in_([JobStatus.queued, JobStatus.running])
            )
        ).all()
        for job_id in open_jobs:
            lifecycle.cancel_job(session, job_id, by="an administrator (team disabled)")
            cancelled += 1
    elif not disabled:
        team.disabled_at = None
    KEY_CACHE.forget(team_id=team.id)
    audit(
        session,
        actor=actor,
        action="disable_team" if disabled else "enable_team",
        target=team.id,
        details={"jobs_cancelled": cancelled},
    )
    return cancelled


def list_keys(session: Session, *, team: Team) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.created_at)))


def revoke_key(session: Session, *, key_id: str, actor: str = ADMIN) -> None:
    if not revoke_api_key(session, key_id=key_id):
        raise NotFound(f"no unrevoked key {key_id}")
    audit(session, actor=actor, action="revoke_key", target=key_id)


def cancel_any_job(session: Session, *, job_id: str, actor: str = ADMIN) -> None:
    if session.get(Job, job_id) is None:
        raise NotFound(f"job {job_id} not found")
    lifecycle.cancel_job(session, job_id, by="an administrator")
    audit(session, actor=actor, action="cancel_job", target=job_id)


def audit_entries(session: Session, *, limit: int = 100) -> list[AuditEntry]:
    return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))


def drain_worker(session: Session, *, name: str, actor: str = ADMIN) -> list[str]:
    """`w2s-service drain`: mark the worker draining (service.workers.drain_worker); audited."""
    from service.workers import drain_worker as drain

    asked = drain(session, name, ask_stages=False)  # the worker asks them once it stopped taking work
    audit(session, actor=actor, action="drain_worker", target=name)
    return asked
