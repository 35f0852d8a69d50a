"""worker registry and the planner's runtime

``workers``: each worker process's queues, runtime (a hash of its library versions and w2s code, the
ones stage keys hash) and when it was last seen, so the dispatcher sends a stage only where a worker
can compute the planner's key, or says why it waits. ``jobs.runtime``: the planner's.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 07:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("queues", JSON, nullable=False),
        sa.Column("runtime", sa.String(16), nullable=False),
        sa.Column("versions", JSON, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("runtime", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("runtime")
    op.drop_table("workers")
