"""one metric point per (stage, name, step); stages.sent_at

A stage that is redelivered after its worker died runs again from step 1; its points replace the
lost attempt's instead of doubling the curve, and a progress write retried after a dropped
connection cannot insert twice. ``stages.sent_at`` is when a stage's task was last sent to the
broker: the dispatcher sends a queued stage again when no worker took it for a while (the broker
lost it, e.g. Redis restarted).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 13:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Keep the newest point of any duplicates written before this constraint existed.
    op.execute(
        "DELETE FROM metric_points WHERE id NOT IN "
        "(SELECT MAX(id) FROM metric_points GROUP BY stage_id, name, step)"
    )
    # Batch mode: SQLite (the embedded default) rebuilds the table; Postgres alters it in place.
    with op.batch_alter_table("metric_points") as batch:
        batch.drop_index("ix_metric_points_stage_name_step")
        batch.create_unique_constraint("uq_metric_points_stage_name_step", ["stage_id", "name", "step"])
    op.add_column("stages", sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("sent_at")
    with op.batch_alter_table("metric_points") as batch:
        batch.drop_constraint("uq_metric_points_stage_name_step", type_="unique")
        batch.create_index("ix_metric_points_stage_name_step", ["stage_id", "name", "step"], unique=False)
