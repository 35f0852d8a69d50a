"""What a team holds in storage, held to its quota: the stage outputs its stages computed (results,
test probabilities, soft labels), the checkpoints its stages hold, its resume checkpoints and its
uploaded datasets.

Bytes are counted when written (``artifacts.size_bytes``, ``checkpoint_holds.size_bytes``,
``datasets.size_bytes``) and summed here, so a usage read is one query per kind, not a walk of the
store. Outputs are charged to the team whose stage computed them; a stage completed from another
team's result costs nothing for them. Checkpoints are the large part (a full model's weights per
stage): a team is charged for each checkpoint its own stages hold, whoever computed it, and keeps
its last ``W2S_CHECKPOINTS_KEPT`` (service/checkpoints.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.checkpoints import CHECKPOINT, held_bytes
from service.errors import LimitExceeded
from service.limits import limit_of
from service.models import Artifact, Dataset, Team
from service.settings import Settings

logger = logging.getLogger(__name__)

MB = 2**20  # as upload_quota_mb counts
# A stage's resume checkpoint (w2s/resume.py), charged to the team whose attempt wrote it until the
# stage's result is stored (then the file is removed, and the row with it).
RESUME = "resume"


@dataclass(frozen=True)
class StorageUsage:
    outputs_bytes: int  # results, test probabilities, soft labels
    checkpoints_bytes: int
    uploads_bytes: int
    quota_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.outputs_bytes + self.checkpoints_bytes + self.uploads_bytes


def _artifact_bytes(session: Session, team_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Per team: (output bytes its stages computed, bytes of the checkpoints it holds and of its
    resume checkpoints)."""
    is_resume = Artifact.name == RESUME
    rows = session.execute(
        select(
            Artifact.team_id,
            func.coalesce(func.sum(case((is_resume, 0), else_=Artifact.size_bytes)), 0),
            func.coalesce(func.sum(case((is_resume, Artifact.size_bytes), else_=0)), 0),
        )
        .where(Artifact.team_id.in_(team_ids), Artifact.name != CHECKPOINT)
        .group_by(Artifact.team_id)
    ).all()
    held = held_bytes(session, team_ids)
    usage = {team_id: (int(outputs), int(resume) + held.get(team_id, 0)) for team_id, outputs, resume in rows}
    for team_id, size in held.items():
        usage.setdefault(team_id, (0, size))
    return usage


def _upload_bytes(session: Session, team_ids: list[str]) -> dict[str, int]:
    rows = session.execute(
        select(Dataset.team_id, func.coalesce(func.sum(Dataset.size_bytes), 0))
        .where(Dataset.team_id.in_(team_ids))
        .group_by(Dataset.team_id)
    ).all()
    return {team_id: int(size) for team_id, size in rows}


def storage_of(session: Session, teams: list[Team], settings: Settings) -> dict[str, StorageUsage]:
    """Each team's storage, in two grouped queries (the admin view lists every team)."""
    ids = [team.id for team in teams]
    artifacts, uploads = _artifact_bytes(session, ids), _upload_bytes(session, ids)
    return {
        team.id: StorageUsage(
            *artifacts.get(team.id, (0, 0)),
            uploads.get(team.id, 0),
            limit_of(team, settings, "storage_quota_mb") * MB,
        )
        for team in teams
    }


def team_storage(session: Session, team: Team, settings: Settings) -> StorageUsage:
    return storage_of(session, [team], settings)[team.id]


def _mb(size: int) -> str:
    return f"{size / MB:,.1f} MB"


def check_storage(
    session: Session, team: Team, settings: Settings, *, adding_bytes: int = 0, what: str
) -> None:
    """Refuse ``what`` (a job, an upload) when the team is at its storage quota, or would go over it
    with ``adding_bytes`` more. Call with the team's row locked (``team_for_write``) so parallel
    requests count each other."""
    usage = team_storage(session, team, settings)
    after = usage.total_bytes + adding_bytes
    if after < usage.quota_bytes or (adding_bytes and after == usage.quota_bytes):
        return
    adding = f" and this needs {_mb(adding_bytes)} more" if adding_bytes else ""
    raise LimitExceeded(
        f"storage: {what} refused: your team holds {_mb(usage.total_bytes)} of its "
        f"{_mb(usage.quota_bytes)} storage quota (stage outputs {_mb(usage.outputs_bytes)}, "
        f"checkpoints {_mb(usage.checkpoints_bytes)}, uploads {_mb(usage.uploads_bytes)}){adding}. "
        "Delete uploads you no longer need (DELETE /v1/datasets/{id}); only the last "
        f"{settings.checkpoints_kept} checkpoints are kept; or ask an administrator for a larger "
        "storage_quota_mb",
        limit="storage_quota_mb",
        value=usage.quota_bytes // MB,
    )


def blob_digest(uri: str) -> str | None:
    """The blob an artifact URI names (``<store>#blobs/<sha256>``), or None for a record."""
    _, _, fragment = uri.rpartition("#")
    return fragment.removeprefix("blobs/") if fragment.startswith("blobs/") else None
