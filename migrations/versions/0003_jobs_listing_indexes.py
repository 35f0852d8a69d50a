"""indexes for filtered job listings

``GET /v1/jobs?status=...`` and ``?dataset=...`` page newest first within a team. With only
(team_id, created_at, id), Postgres walks the team's jobs and discards those that do not match, so
a rare status or dataset read hundreds of thousands of rows per page. These two indexes put the
filter in front of the sort key: every page, first or deep, is a seek plus ``limit`` rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 13:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain CREATE INDEX works the same on Postgres and SQLite (the embedded default).
    op.create_index("ix_jobs_team_status_created", "jobs", ["team_id", "status", "created_at", "id"])
    op.create_index("ix_jobs_team_dataset_created", "jobs", ["team_id", "dataset", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_team_dataset_created", table_name="jobs")
    op.drop_index("ix_jobs_team_status_created", table_name="jobs")
