"""admission off the heavy path: control tasks, indexed admission, limits, admin, sessions

- jobs: ``plan_sent_at``/``plan_attempts`` and ``finish_due``/``finish_sent_at``/``finish_attempts``
  (planning and finishing are Celery tasks the dispatcher sends), ``request_hash`` (an idempotency
  key reused with another body is refused), and partial indexes for the two queries that find them.
- stages: ``team_id``, ``priority`` and ``job_created_at`` copied from the job and ``ready`` (planned,
  dependency done), with a partial index that admission seeks per queue and team.
- teams: ``disabled_at``, a priority ceiling and per-team limits.
- new tables: ``team_usage`` (GPU-seconds per team and hour, for fair share), ``audit_log`` (admin
  actions) and ``web_sessions`` (dashboard sign-ins that sign-out revokes on the server).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 14:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TEAM_LIMITS = (
    "max_priority",
    "max_queued_stages",
    "max_stages_per_job",
    "max_stages_per_sweep",
    "upload_quota_mb",
    "requests_per_minute",
)
JSON = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
READY = "status = 'pending' AND ready"
TO_PLAN = "NOT planned AND status IN ('queued', 'running')"
TO_FINISH = "finish_due AND status = 'running'"


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        for name in TEAM_LIMITS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=True))

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("plan_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("plan_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("finish_due", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("finish_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("finish_attempts", sa.Integer(), nullable=False, server_default="0"))

    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("team_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("job_created_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("ready", sa.Boolean(), nullable=False, server_default=sa.false()))
    # Copy the job's columns; a pending stage is ready when it has a key and nothing to wait for.
    op.execute(
        "UPDATE stages SET team_id = (SELECT team_id FROM jobs WHERE jobs.id = stages.job_id), "
        "priority = (SELECT priority FROM jobs WHERE jobs.id = stages.job_id), "
        "job_created_at = (SELECT created_at FROM jobs WHERE jobs.id = stages.job_id)"
    )
    op.execute(
        "UPDATE stages SET ready = (stage_key IS NOT NULL AND (depends_on_id IS NULL OR EXISTS ("
        "SELECT 1 FROM stages AS dependency WHERE dependency.id = stages.depends_on_id "
        "AND dependency.status IN ('succeeded', 'cached'))))"
    )
    # Jobs whose every stage already has a result are finished by a control task.
    op.execute(
        "UPDATE jobs SET finish_due = (status = 'running' AND planned AND NOT EXISTS ("
        "SELECT 1 FROM stages WHERE stages.job_id = jobs.id "
        "AND stages.status NOT IN ('succeeded', 'cached')))"
    )
    with op.batch_alter_table("stages") as batch:
        batch.alter_column("team_id", existing_type=sa.String(32), nullable=False)
        batch.alter_column("job_created_at", existing_type=sa.DateTime(timezone=True), nullable=False)

    op.create_index("ix_stages_depends_on", "stages", ["depends_on_id"])
    op.create_index("ix_stages_team_status", "stages", ["team_id", "status"])
    op.create_index(
        "ix_stages_ready",
        "stages",
        ["gpu_class", "team_id", sa.text("priority DESC"), "job_created_at", "job_id", "order"],
        postgresql_where=sa.text(READY),
        sqlite_where=sa.text(READY),
    )
    op.create_index(
        "ix_jobs_to_plan",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text(TO_PLAN),
        sqlite_where=sa.text(TO_PLAN),
    )
    op.create_index(
        "ix_jobs_to_finish",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text(TO_FINISH),
        sqlite_where=sa.text(TO_FINISH),
    )

    op.create_table(
        "team_usage",
        sa.Column("team_id", sa.String(32), sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("details", JSON, nullable=True),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(32), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_web_sessions_team_id", "web_sessions", ["team_id"])


def downgrade() -> None:
    op.drop_index("ix_web_sessions_team_id", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("team_usage")
    op.drop_index("ix_jobs_to_finish", table_name="jobs")
    op.drop_index("ix_jobs_to_plan", table_name="jobs")
    op.drop_index("ix_stages_ready", table_name="stages")
    op.drop_index("ix_stages_team_status", table_name="stages")
    op.drop_index("ix_stages_depends_on", table_name="stages")
    with op.batch_alter_table("stages") as batch:
        for name in ("ready", "job_created_at", "priority", "team_id"):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in ("finish_attempts", "finish_sent_at", "finish_due", "plan_attempts", "plan_sent_at"):
            batch.drop_column(name)
        batch.drop_column("request_hash")
    with op.batch_alter_table("teams") as batch:
        for name in reversed(TEAM_LIMITS):
            batch.drop_column(name)
        batch.drop_column("disabled_at")
