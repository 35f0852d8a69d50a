"""Teams and keys (admin), and a team's own usage."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import AdminDep, SessionDep, SettingsDep, TeamDep
from api.schemas import ApiKeyCreate, ApiKeyCreated, TeamCreate, TeamPublic, UsagePublic, error_responses
from service import admin, auth
from service.models import Team
from service.usage import team_usage

# 401 without a key, 403 for a team key on the admin endpoints, 409 for a taken team name.
router = APIRouter(tags=["teams"], responses=error_responses(400, 401, 403, 404, 409, 413, 422))


@router.post("/teams", status_code=status.HTTP_201_CREATED, response_model=TeamPublic)
def create_team(body: TeamCreate, session: SessionDep, _: AdminDep) -> Team:
    """Admin only. 409 if the name is taken. Keys: POST /v1/teams/{id}/keys."""
    team = auth.create_team(session, **body.model_dump())
    admin.audit(session, action="create_team", target=team.id, details=body.model_dump())
    return team


@router.post("/teams/{team_id}/keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
def create_key(team_id: str, body: ApiKeyCreate, session: SessionDep, _: AdminDep) -> ApiKeyCreated:
    """Admin only. The key is in this response and nowhere else."""
    team = admin.team_by_id(session, team_id)
    row, key = admin.new_key(session, team=team, name=body.name)
    return ApiKeyCreated(id=row.id, team_id=team.id, name=row.name, prefix=row.prefix, key=key)


@router.get("/teams/me", response_model=TeamPublic)
def read_my_team(team: TeamDep) -> Team:
    return team


@router.get("/teams/me/usage", response_model=UsagePublic)
def read_usage(team: TeamDep, session: SessionDep, settings: SettingsDep) -> UsagePublic:
    return UsagePublic(**team_usage(session, team=team, settings=settings))
