"""storage quota, stage time limits and bounded curves

- ``artifacts.team_id`` / ``artifacts.size_bytes``: who produced a stored output and how large it
  is, so a team's storage (outputs, checkpoints, uploads) can be counted and held to a quota;
  ``teams.storage_quota_mb`` (NULL: W2S_STORAGE_QUOTA_MB).
- ``teams.stage_time_limit_s`` (NULL: W2S_STAGE_TIME_LIMIT_S), ``jobs.stage_time_limit_s`` (what a
  job asked for), ``stages.time_limit_s`` and ``stages.deadline_at`` (the current attempt's end).
- ``metric_series``: the exact minimum, maximum and last value of each curve, whose points are
  downsampled as they are written (w2s/curves.py).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("team_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch.create_index("ix_artifacts_team_name", ["team_id", "name", "created_at"])
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("storage_quota_mb", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("stage_time_limit_s", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stage_time_limit_s", sa.Integer(), nullable=True))
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("time_limit_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "metric_series",
        sa.Column(
            "stage_id", sa.String(32), sa.ForeignKey("stages.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("points_seen", sa.BigInteger(), nullable=False),
        sa.Column("min_value", sa.Float(), nullable=False),
        sa.Column("max_value", sa.Float(), nullable=False),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("last_value", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("metric_series")
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("deadline_at")
        batch.drop_column("time_limit_s")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stage_time_limit_s")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("stage_time_limit_s")
        batch.drop_column("storage_quota_mb")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_index("ix_artifacts_team_name")
        batch.drop_column("size_bytes")
        batch.drop_column("team_id")
