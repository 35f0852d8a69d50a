"""one metric point per (stage, name, step)

A stage that is redelivered after its worker died runs again from step 1; its points replace the
lost attempt's instead of doubling the curve, and a progress write retried after a dropped
connection cannot insert twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 13:20:00
"""

from __future__ import annotations

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


def downgrade() -> None:
    with op.batch_alter_table("metric_points") as batch:
        batch.drop_constraint("uq_metric_points_stage_name_step", type_="unique")
        batch.create_index("ix_metric_points_stage_name_step", ["stage_id", "name", "step"], unique=False)
