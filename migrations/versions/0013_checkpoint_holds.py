"""checkpoints held by stages, not by the team that computed them; an upload count limit

``checkpoint_holds``: one row per stage whose result names a saved checkpoint (computed or completed
from the cache, any team's). A checkpoint file is removed only when no stage holds it; a team's
"last N checkpoints" rule releases only its own stages' holds, and a team is charged for the
checkpoints its own stages hold. ``artifacts.removed_at``: a checkpoint no stage holds, removed (no
cached completion may name it again); ``artifacts.files_removed_at``: its file and stored result are
gone from the store too (until then a sweep removes them). ``teams.max_uploads``: an admin's
per-team override of W2S_MAX_UPLOADS.

Existing checkpoints get a hold for every finished stage whose result names them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 23:40:00
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_holds",
        sa.Column(
            "stage_id", sa.String(32), sa.ForeignKey("stages.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("stage_key", sa.String(64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_checkpoint_holds_team_created", "checkpoint_holds", ["team_id", "created_at"])
    op.create_index("ix_checkpoint_holds_stage_key", "checkpoint_holds", ["stage_key"])
    # Plain ALTER TABLE, never a rebuild: on SQLite (the embedded default, foreign keys on) rebuilding
    # ``teams`` would cascade-delete every team's keys and jobs.
    op.add_column("artifacts", sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("artifacts", sa.Column("files_removed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("teams", sa.Column("max_uploads", sa.Integer(), nullable=True))
    _hold_existing_checkpoints()


def _hold_existing_checkpoints() -> None:
    """A hold for each finished stage whose result names a recorded checkpoint."""
    bind = op.get_bind()
    checkpoints = {
        key: (uri, size, created)
        for key, uri, size, created in bind.execute(
            sa.text("SELECT stage_key, uri, size_bytes, created_at FROM artifacts WHERE name = 'checkpoint'")
        )
    }
    if not checkpoints:
        return
    holds: list[dict[str, Any]] = []
    stages = bind.execute(
        sa.text(
            "SELECT id, team_id, stage_key, result FROM stages "
            "WHERE status IN ('succeeded', 'cached') AND stage_key IS NOT NULL AND result IS NOT NULL"
        )
    )
    for stage_id, team_id, key, result in stages:
        record = json.loads(result) if isinstance(result, str) else result
        if key in checkpoints and (record or {}).get("checkpoint"):
            uri, size, created = checkpoints[key]
            holds.append(
                {"stage_id": stage_id, "team_id": team_id, "stage_key": key, "uri": uri}
                | {"size_bytes": size, "created_at": created}
            )
    if holds:
        bind.execute(
            sa.text(
                "INSERT INTO checkpoint_holds (stage_id, team_id, stage_key, uri, size_bytes, created_at) "
                "VALUES (:stage_id, :team_id, :stage_key, :uri, :size_bytes, :created_at)"
            ),
            holds,
        )


def downgrade() -> None:
    op.drop_column("teams", "max_uploads")  # ALTER TABLE ... DROP COLUMN: SQLite 3.35+, no rebuild
    op.drop_column("artifacts", "files_removed_at")
    op.drop_column("artifacts", "removed_at")
    op.drop_index("ix_checkpoint_holds_stage_key", table_name="checkpoint_holds")
    op.drop_index("ix_checkpoint_holds_team_created", table_name="checkpoint_holds")
    op.drop_table("checkpoint_holds")
