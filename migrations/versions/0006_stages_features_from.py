"""a probe stage may wait for the stage that computes its features

In a deployment with GPU and CPU workers, a probe student's head trains on a CPU worker on features
a GPU computed for the ceiling stage of the same model (the same texts): the student is ready only
once both its supervisor (``depends_on_id``) and that stage (``features_from_id``) have results.
Rows before this revision keep NULL: their stages computed their own features.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stages") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("features_from_id", sa.String(length=32), nullable=True))
        batch.create_foreign_key(
            "fk_stages_features_from_id_stages", "stages", ["features_from_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_stages_features_from", ["features_from_id"])


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        batch.drop_index("ix_stages_features_from")
        batch.drop_constraint("fk_stages_features_from_id_stages", type_="foreignkey")
        batch.drop_column("features_from_id")
