"""GPU-seconds, stage counts and storage per team."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Job, Stage, StageEvent, Team, utcnow
from service.settings import Settings
from service.states import StageEventKind, StageStatus
from service.storage import team_storage


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
    # Seconds by the device kind the stages ran on (a stage on a GPU records the GPU's name).
    by_kind = {"gpu": 0.0, "cpu": 0.0}
    for on_gpu, seconds in session.execute(
        select(
            team_stages.c.gpu.is_not(None), func.coalesce(func.sum(team_stages.c.gpu_seconds), 0.0)
        ).group_by(team_stages.c.gpu.is_not(None))
    ):
        by_kind["gpu" if on_gpu else "cpu"] += float(seconds or 0.0)
    return {
        "team_id": team.id,
        "gpu_seconds_total": float(total or 0.0),
        "gpu_seconds_window": float(window or 0.0),
        "window_hours": settings.fair_share_window_h,
        "running_stages": counts.get(StageStatus.running, 0),
        "queued_stages": counts.get(StageStatus.queued, 0),
        "pending_stages": counts.get(StageStatus.pending, 0),
        "device_seconds": by_kind,
        "gpu_quota": team.gpu_quota if team.gpu_quota is not None else settings.default_gpu_quota,
        "storage": storage_public(team_storage(session, team, settings)),
        "preemptions_window": preemptions_by_team(session, settings, [team.id]).get(team.id, 0),
    }


def preemptions_by_team(session: Session, settings: Settings, team_ids: list[str]) -> dict[str, int]:
    """How often each team's running stages were preempted (asked to yield for other work) within the
    fair-share window: the admin's view of who gives way to whom."""
    since = utcnow() - dt.timedelta(hours=settings.fair_share_window_h)
    return {
        team_id: int(count)
        for team_id, count in session.execute(
            select(StageEvent.team_id, func.count())
            .where(
                StageEvent.team_id.in_(team_ids),
                StageEvent.kind == StageEventKind.preempt_asked,
                StageEvent.at >= since,
            )
            .group_by(StageEvent.team_id)
        )
    }


def storage_public(usage: Any) -> dict[str, int]:
    """A StorageUsage as the API shows it (api.schemas.StoragePublic)."""
    return {
        "used_bytes": usage.total_bytes,
        "quota_bytes": usage.quota_bytes,
        "outputs_bytes": usage.outputs_bytes,
        "checkpoints_bytes": usage.checkpoints_bytes,
        "uploads_bytes": usage.uploads_bytes,
    }
