"""/v1/admin: teams (limits, weight, quota, priority ceiling, disable), keys, any team's jobs, the
audit log, the lifecycle's health (doctor). Every endpoint needs the admin key; every change is
audited (service/admin.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from api.deps import AdminDep, SessionDep, SettingsDep
from api.schemas import (
    ApiKeyPublic,
    AuditEntryPublic,
    CheckupPublic,
    FindingPublic,
    JobPublic,
    JobsPublic,
    StoragePublic,
    TeamAdminPublic,
    TeamUpdate,
    error_responses,
    job_public,
    summary_public,
)
from service import admin, doctor
from service import jobs as job_service
from service.models import Job
from service.states import JobStatus
from service.storage import storage_of
from service.usage import preemptions_by_team, storage_public

router = APIRouter(prefix="/admin", tags=["admin"], responses=error_responses(400, 401, 403, 404, 409, 422))


@router.get("/teams", response_model=list[TeamAdminPublic])
def list_teams(session: SessionDep, settings: SettingsDep, _: AdminDep) -> list[TeamAdminPublic]:
    """Every team with its limits and the storage it holds."""
    teams = admin.list_teams(session)
    storage = storage_of(session, teams, settings)
    preempted = preemptions_by_team(session, settings, [team.id for team in teams])
    return [
        TeamAdminPublic.model_validate(team).model_copy(
            update={
                "storage": StoragePublic(**storage_public(storage[team.id])),
                "preemptions_window": preempted.get(team.id, 0),
            }
        )
        for team in teams
    ]


@router.patch("/teams/{team_id}", response_model=TeamAdminPublic)
def update_team(team_id: str, body: TeamUpdate, session: SessionDep, _: AdminDep) -> TeamAdminPublic:
    """Change a team's weight, quota, priority ceiling or limits (null: back to the setting), or
    disable it (its keys stop working and its open jobs are cancelled) or enable it."""
    team = admin.team_by_id(session, team_id)
    changes = body.model_dump(exclude_unset=True)
    disabled = changes.pop("disabled", None)
    if changes:
        admin.update_team(session, team=team, changes=changes)
    if disabled is not None:
        admin.set_team_disabled(session, team=team, disabled=disabled)
    session.flush()
    return TeamAdminPublic.model_validate(team)


@router.get("/teams/{team_id}/keys", response_model=list[ApiKeyPublic])
def list_keys(team_id: str, session: SessionDep, _: AdminDep) -> list[ApiKeyPublic]:
    team = admin.team_by_id(session, team_id)
    return [ApiKeyPublic.model_validate(key) for key in admin.list_keys(session, team=team)]


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key(key_id: str, session: SessionDep, _: AdminDep) -> None:
    """Revoke a key: it stops working at once in this process, within seconds in the others."""
    admin.revoke_key(session, key_id=key_id)


@router.get("/jobs", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    _: AdminDep,
    team_id: Annotated[str | None, Query(max_length=64)] = None,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobsPublic:
    """Any team's jobs (all teams' without ``team_id``), newest first."""
    rows, next_cursor = job_service.list_job_summaries(
        session, team_id=team_id, status=status_, limit=limit, cursor=cursor
    )
    return JobsPublic(data=[summary_public(row) for row in rows], next_cursor=next_cursor)


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def cancel_job(job_id: str, session: SessionDep, _: AdminDep) -> JobPublic:
    admin.cancel_any_job(session, job_id=job_id)
    session.expire_all()
    return job_public(session.get(Job, job_id))  # type: ignore[arg-type]


@router.get("/audit", response_model=list[AuditEntryPublic])
def read_audit(
    session: SessionDep, _: AdminDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AuditEntryPublic]:
    """Admin actions, newest first."""
    return [AuditEntryPublic.model_validate(entry) for entry in admin.audit_entries(session, limit=limit)]


@router.get("/doctor", response_model=CheckupPublic)
def read_doctor(
    session: SessionDep,
    settings: SettingsDep,
    _: AdminDep,
    grace_s: Annotated[float, Query(ge=0, le=86_400)] = 60.0,
) -> CheckupPublic:
    """The jobs that break a lifecycle invariant, and why: wedged ones first (no dispatch round can
    move them), then overdue work (due for longer than its lease plus ``grace_s``: is the dispatcher
    running?). Empty while the dispatcher runs."""
    result = doctor.checkup(session, settings, grace_s=grace_s, outputs=True)
    return CheckupPublic(
        healthy=result.healthy,
        checked_jobs=result.checked_jobs,
        findings=[FindingPublic(**finding.to_dict()) for finding in result.findings],
    )
