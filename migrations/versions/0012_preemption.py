"""preemption with resume: stages asked to yield, their preemptions and checkpoints; draining workers

``stages``: ``yield_requested_at`` / ``yield_reason`` (the running attempt is asked to checkpoint and
hand its slot back), ``preemptions`` and ``last_preempted_at`` (no stage is preempted twice within a
window), ``checkpoint_step`` (where its next attempt resumes). ``stage_events``: checkpoints,
preemptions, resumes and drains, for the timeline and the admin's counts. ``workers.draining_since``.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 22:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stages") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("yield_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("yield_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_preempted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("checkpoint_step", sa.Integer(), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("draining_since", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "stage_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("stage_id", sa.String(32), sa.ForeignKey("stages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_stage_events_stage_id", "stage_events", ["stage_id", "id"])
    op.create_index("ix_stage_events_team_kind_at", "stage_events", ["team_id", "kind", "at"])


def downgrade() -> None:
    op.drop_index("ix_stage_events_team_kind_at", table_name="stage_events")
    op.drop_index("ix_stage_events_stage_id", table_name="stage_events")
    op.drop_table("stage_events")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("draining_since")
    with op.batch_alter_table("stages") as batch:
        for name in (
            "checkpoint_step",
            "last_preempted_at",
            "preemptions",
            "yield_reason",
            "yield_requested_at",
        ):
            batch.drop_column(name)
