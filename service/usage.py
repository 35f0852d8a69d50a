"""GPU-seconds and stage counts per team."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Job, Stage, Team, utcnow
from service.settings import Settings
from service.states import StageStatus


def team_usage(session: Session, *, team: Team, settings: Settings) -> dict[str, Any]:
    since = utcnow() - dt.timedelta(hours=settings.fair_share_window_h)
    team_stages = select(Stage).join(Job, Stage.job_id == Job.id).where(Job.team_id == team.id).subquery()
    total = session.scalar(select(func.coalesce(func.sum(team_stages.c.gpu_seconds), 0.0)))
    window = session.scalar(
        select(func.coalesce(func.sum(team_stages.c.gpu_seconds), 0.0)).where(
            team_stages.c.finished_at >= since
        )
    )
    counts = dict(
        session.execute(select(team_stages.c.status, func.count()).group_by(team_stages.c.status)).all()
    )
    return {
        "team_id": team.id,
        "gpu_seconds_total": float(total or 0.0),
        "gpu_seconds_window": float(window or 0.0),
        "window_hours": settings.fair_share_window_h,
        "running_stages": counts.get(StageStatus.running, 0),
        "queued_stages": counts.get(StageStatus.queued, 0),
        "pending_stages": counts.get(StageStatus.pending, 0),
        "gpu_quota": team.gpu_quota if team.gpu_quota is not None else settings.default_gpu_quota,
    }
