"""exports of finished jobs to MLflow and Weights & Biases

``job_exports``: one row per (job, tracking tool), pending until an export task succeeds, retried
with back-off while the tracking server is down, fenced by a token per attempt. ``teams``: where the
team's jobs are exported and the names of the environment variables that hold its credentials.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TEAM_COLUMNS = [
    ("mlflow_tracking_uri", 500),
    ("mlflow_token_env", 100),
    ("wandb_project", 200),
    ("wandb_entity", 200),
    ("wandb_key_env", 100),
]


def upgrade() -> None:
    op.create_table(
        "job_exports",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("team_id", sa.String(32), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("token", sa.String(32), nullable=True),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("run_url", sa.String(1000), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("job_id", "target", name="uq_job_exports_job_target"),
    )
    op.create_index("ix_job_exports_due", "job_exports", ["status", "due_at"])
    op.create_index("ix_job_exports_team_id", "job_exports", ["team_id"])
    with op.batch_alter_table("teams") as batch:  # batch: SQLite, the embedded default, alters by copy
        for name, length in TEAM_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        for name, _ in reversed(TEAM_COLUMNS):
            batch.drop_column(name)
    op.drop_index("ix_job_exports_team_id", table_name="job_exports")
    op.drop_index("ix_job_exports_due", table_name="job_exports")
    op.drop_table("job_exports")
