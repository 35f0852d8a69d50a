"""/v1/sweeps: a weak x strong grid on one dataset, submitted as one job per pair, read as a table."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, SweepDep, TeamDep, TeamIdDep, in_session, team_for_write
from api.schemas import SweepCreate, SweepPublic, SweepsPublic, SweepSummary, body_location, error_responses
from service import sweeps as sweep_service
from w2s.spec import SpecError

router = APIRouter(prefix="/sweeps", tags=["sweeps"], responses=error_responses(400, 401, 404, 413, 422))


def _spec_errors(error: SpecError) -> RequestValidationError:
    # List indices as integers, as pydantic reports them: ["body", "strong_models", 1, "mode"].
    return RequestValidationError(
        [
            {
                "loc": tuple(body_location(loc)),
                "msg": msg,
                "type": "spec",
            }
            for loc, msg in error.errors
        ]
    )


def _public(report: sweep_service.SweepReport) -> SweepPublic:
    return SweepPublic.model_validate(dataclasses.asdict(report))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic)
async def create_sweep(body: SweepCreate, team_id: TeamIdDep, settings: SettingsDep) -> SweepPublic:
    """Queue one job per (weak, strong) pair, each with every loss and seed, all or nothing: an
    invalid pair is a 422 naming the model (``strong_models.1.mode``) and creates nothing.

    Stages the jobs share (a weak model's weak stage, a strong model's ceiling) run once: the
    dispatcher deduplicates by stage key."""

    def create(session: Session) -> SweepPublic:
        sweep = sweep_service.create_sweep(
            session,
            team=team_for_write(session, team_id),
            settings=settings,
            grid=body.model_dump(exclude={"name", "priority"}),
            name=body.name,
            priority=body.priority,
        )
        return _public(sweep_service.sweep_report(session, sweep=sweep))

    try:
        return await in_session(create)
    except SpecError as error:
        raise _spec_errors(error) from None


@router.get("", response_model=SweepsPublic)
def list_sweeps(
    session: SessionDep,
    team: TeamDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> SweepsPublic:
    """The team's sweeps, newest first, with status and job count."""
    listings, next_cursor = sweep_service.list_sweeps(session, team_id=team.id, limit=limit, cursor=cursor)
    return SweepsPublic(
        data=[SweepSummary.model_validate(dataclasses.asdict(item)) for item in listings],
        next_cursor=next_cursor,
    )


@router.get("/{sweep_id}", response_model=SweepPublic)
def read_sweep(sweep: SweepDep, session: SessionDep) -> SweepPublic:
    """One row per job (status, weak and ceiling accuracy, accuracy and PGR per loss) and PGR per
    loss over the finished jobs."""
    return _public(sweep_service.sweep_report(session, sweep=sweep))
