"""a sweep job's position in its grid

A sweep may list one model twice with different options (``weight_decay`` 0 and 0.1, say) to vary
them. The job's model name alone cannot tell those apart, so each job of a sweep records which
entry of ``weak_models`` and ``strong_models`` it came from; the sweep's table and figure label
entries by it. Jobs made before this revision keep NULL and are labelled by model name.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("sweep_weak_index", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("sweep_strong_index", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sweep_strong_index")
        batch.drop_column("sweep_weak_index")
