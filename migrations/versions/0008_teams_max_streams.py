"""a team's own cap on open live metric streams

``teams.max_streams_per_team``: NULL means the setting (W2S_MAX_STREAMS_PER_TEAM), as for the
other per-team limits an administrator may set.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("max_streams_per_team", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("max_streams_per_team")
