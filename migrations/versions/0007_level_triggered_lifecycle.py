"""level-triggered lifecycle: due work derived from rows, fenced attempts, leased control tasks,
stored stage plans

What is due for a job is now derived from its rows (service/states.py names the predicates): the
number of its stages without a result (``stages_left``, recomputed from the stage rows under the
job's lock whenever they change) replaces the ``finish_due`` flag that one event set and another
cleared. Planning and finishing are leased (``control_*``): the round hands a task a token and a
lease of seconds, a running task extends it, and a lapsed lease makes the task due again; that
replaces ``plan_sent_at``/``finish_sent_at`` and their attempt counts. Stages get a ``fence`` that
every claim increments and nothing resets (``attempts`` counts towards the limit and a retry resets
it), and the planner's full ``plan`` that workers execute without re-deriving it; jobs keep the
planner's summary of their data (``data_summary``), so finishing reads no dataset either.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
PLAN_DUE = "status IN ('queued', 'running') AND NOT planned"
FINISH_DUE = "status IN ('queued', 'running') AND planned AND stages_left = 0"
OLD_TO_PLAN = "NOT planned AND status IN ('queued', 'running')"
OLD_TO_FINISH = "finish_due AND status = 'running'"
LEFT = (
    "(SELECT count(*) FROM stages WHERE stages.job_id = jobs.id "
    "AND stages.status NOT IN ('succeeded', 'cached'))"
)


def upgrade() -> None:
    op.drop_index("ix_jobs_to_finish", table_name="jobs")
    op.drop_index("ix_jobs_to_plan", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite, the embedded default, alters by copy
        batch.add_column(sa.Column("stages_left", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("control_task", sa.String(16), nullable=True))
        batch.add_column(sa.Column("control_token", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("control_lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("control_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("data_summary", JSON, nullable=True))
        for name in ("plan_sent_at", "plan_attempts", "finish_due", "finish_sent_at", "finish_attempts"):
            batch.drop_column(name)
    op.execute(f"UPDATE jobs SET stages_left = {LEFT}")
    op.create_index("ix_jobs_plan_due", "jobs", ["created_at"], postgresql_where=sa.text(PLAN_DUE),
                    sqlite_where=sa.text(PLAN_DUE))  # fmt: skip
    op.create_index("ix_jobs_finish_due", "jobs", ["created_at"], postgresql_where=sa.text(FINISH_DUE),
                    sqlite_where=sa.text(FINISH_DUE))  # fmt: skip
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("fence", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("plan", JSON, nullable=True))
    op.execute("UPDATE stages SET fence = attempts")


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("plan")
        batch.drop_column("fence")
    op.drop_index("ix_jobs_finish_due", table_name="jobs")
    op.drop_index("ix_jobs_plan_due", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("plan_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("plan_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("finish_due", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("finish_sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("finish_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.execute(f"UPDATE jobs SET finish_due = (status = 'running' AND planned AND {LEFT} = 0)")
    with op.batch_alter_table("jobs") as batch:
        for name in (
            "data_summary",
            "control_attempts",
            "control_lease_until",
            "control_token",
            "control_task",
            "stages_left",
        ):
            batch.drop_column(name)
    op.create_index("ix_jobs_to_plan", "jobs", ["created_at"], postgresql_where=sa.text(OLD_TO_PLAN),
                    sqlite_where=sa.text(OLD_TO_PLAN))  # fmt: skip
    op.create_index("ix_jobs_to_finish", "jobs", ["created_at"], postgresql_where=sa.text(OLD_TO_FINISH),
                    sqlite_where=sa.text(OLD_TO_FINISH))  # fmt: skip
