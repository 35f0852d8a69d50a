"""Database tables (SQLAlchemy 2). Every change here comes with an Alembic migration."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from service.states import JOB_FINISH_DUE, JOB_PLAN_DUE, STAGE_READY, JobStatus, StageStatus
from service.team_names import team_name_key

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER primary keys.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that comes back aware, in UTC, from every database: SQLite keeps no zone and
    returned naive values, which the API then showed without the 'Z' Postgres's carry."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONType,
        dt.datetime: UTCDateTime(),
    }


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # The name as uniqueness compares it (service/team_names.py): "Alpha" and "alpha" cannot both be.
    # Filled on every insert; nullable in the schema only because SQLite cannot add NOT NULL in place.
    name_key: Mapped[str] = mapped_column(
        String(100),
        nullable=True,
        unique=True,
        index=True,
        default=lambda context: team_name_key(context.get_current_parameters()["name"]),
    )
    weight: Mapped[float] = mapped_column(Float, default=1.0)  # fair-share weight
    gpu_quota: Mapped[int | None] = mapped_column(Integer)  # concurrent GPU stages; None = default
    allow_trust_remote_code: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Set by an admin: the team's keys stop working and its open jobs are cancelled.
    disabled_at: Mapped[dt.datetime | None]
    # Per-team overrides of the limits in service.settings; None = the setting.
    max_priority: Mapped[int | None] = mapped_column(Integer)  # highest job priority it may ask for
    max_queued_stages: Mapped[int | None] = mapped_column(Integer)
    max_stages_per_job: Mapped[int | None] = mapped_column(Integer)
    max_stages_per_sweep: Mapped[int | None] = mapped_column(Integer)
    upload_quota_mb: Mapped[int | None] = mapped_column(Integer)
    max_streams_per_team: Mapped[int | None] = mapped_column(Integer)
    storage_quota_mb: Mapped[int | None] = mapped_column(Integer)  # artifacts and uploads it may hold
    stage_time_limit_s: Mapped[int | None] = mapped_column(Integer)  # longest run of one stage attempt
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_uploads: Mapped[int | None] = mapped_column(Integer)  # uploaded datasets it may hold at once
    # Where the team's finished jobs are exported (service/exports.py); None = the setting. The
    # credentials are the names of environment variables on the control workers, never the secrets.
    mlflow_tracking_uri: Mapped[str | None] = mapped_column(String(500))
    mlflow_token_env: Mapped[str | None] = mapped_column(String(100))
    wandb_project: Mapped[str | None] = mapped_column(String(200))
    wandb_entity: Mapped[str | None] = mapped_column(String(200))
    wandb_key_env: Mapped[str | None] = mapped_column(String(100))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    key_hash: Mapped[str] = mapped_column(
        String(64), unique=True
    )  # sha256 of the key; the key is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so a user can tell keys apart
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]

    team: Mapped[Team] = relationship()


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    grid: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key", name="uq_jobs_team_idempotency_key"),
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        # Filtered listings (status, dataset) seek to their page instead of filtering a team's jobs.
        Index("ix_jobs_team_status_created", "team_id", "status", "created_at", "id"),
        Index("ix_jobs_team_dataset_created", "team_id", "dataset", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        # The dispatcher's two job queries touch only the jobs they return.
        Index(
            "ix_jobs_plan_due",
            "created_at",
            postgresql_where=text(JOB_PLAN_DUE),
            sqlite_where=text(JOB_PLAN_DUE),
        ),
        Index(
            "ix_jobs_finish_due",
            "created_at",
            postgresql_where=text(JOB_FINISH_DUE),
            sqlite_where=text(JOB_FINISH_DUE),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"), index=True)
    # Which entries of the sweep's weak_models and strong_models the job pairs: one model may be
    # listed twice with different options, and its name alone cannot tell them apart.
    sweep_weak_index: Mapped[int | None] = mapped_column(Integer)
    sweep_strong_index: Mapped[int | None] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200), default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    error: Mapped[str | None] = mapped_column(Text)
    spec: Mapped[dict[str, Any]]
    # Denormalised from the spec for filtering.
    dataset: Mapped[str] = mapped_column(String(300), index=True)
    weak_model: Mapped[str] = mapped_column(String(300))
    strong_model: Mapped[str] = mapped_column(String(300))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # sha256 of the request body that created the job: an Idempotency-Key reused with another body
    # is refused instead of answered with this job.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The planner's runtime (w2s.stages.runtime_id): workers that can compute its stage keys have it.
    runtime: Mapped[str | None] = mapped_column(String(16))
    stage_time_limit_s: Mapped[int | None] = mapped_column(Integer)  # asked for; the team's limit caps it
    planned: Mapped[bool] = mapped_column(Boolean, default=False)  # stage plans and keys stored
    # Stages without a result, recomputed from the stage rows (under this row's lock) by every change
    # of them (service/lifecycle.py refresh_job): finishing is due when it is 0.
    stages_left: Mapped[int] = mapped_column(Integer, default=0)
    # Planning and finishing run as control tasks (worker/control.py), leased: the round gives a task
    # a token and a lease of seconds, the running task extends it, and a lapsed lease makes the work
    # due again. Writes of a task whose token is no longer current change nothing.
    control_task: Mapped[str | None] = mapped_column(String(16))  # plan | finish, while leased
    control_token: Mapped[int] = mapped_column(Integer, default=0)
    control_lease_until: Mapped[dt.datetime | None]
    control_attempts: Mapped[int] = mapped_column(Integer, default=0)  # of the current task kind
    # Written by planning: each seed's data summary, the results' data block and where the test
    # rows are, so that finishing reads no dataset.
    data_summary: Mapped[dict[str, Any] | None]
    results: Mapped[dict[str, Any] | None]
    manifest: Mapped[dict[str, Any] | None]
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    team: Mapped[Team] = relationship()
    stages: Mapped[list[Stage]] = relationship(
        back_populates="job",
        order_by="Stage.order",
        cascade="all, delete-orphan",
        foreign_keys="Stage.job_id",
    )


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (
        UniqueConstraint("job_id", "kind", "seed", name="uq_stages_job_kind_seed"),
        Index("ix_stages_status", "status"),
        Index("ix_stages_stage_key", "stage_key"),
        Index("ix_stages_depends_on", "depends_on_id"),
        Index("ix_stages_features_from", "features_from_id"),
        Index("ix_stages_team_status", "team_id", "status"),
        # Admission reads, per queue and team, the next few ready stages in order: a seek.
        Index(
            "ix_stages_ready",
            "gpu_class",
            "team_id",
            text("priority DESC"),
            "job_created_at",
            "job_id",
            "order",
            postgresql_where=text(STAGE_READY),
            sqlite_where=text(STAGE_READY),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # Copied from the job, so admission orders ready stages from one index without a join.
    team_id: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    job_created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Planned (it has a key and a queue) and its dependency, if any, has a result.
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    order: Mapped[int] = mapped_column(Integer)  # run order within the job
    kind: Mapped[str] = mapped_column(String(200))  # weak | ceiling | student:<loss label>
    seed: Mapped[int] = mapped_column(Integer)
    depends_on_id: Mapped[str | None] = mapped_column(ForeignKey("stages.id", ondelete="SET NULL"))
    # A probe stage whose head trains on a CPU worker: the stage that computes its features on a GPU
    # (set at planning). Ready once both it and depends_on have results.
    features_from_id: Mapped[str | None] = mapped_column(
        ForeignKey("stages.id", ondelete="SET NULL", name="fk_stages_features_from_id_stages")
    )
    stage_key: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=StageStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # towards the limit; a retry resets it
    # The current attempt's token: every claim increments it and nothing resets it, so a heartbeat,
    # progress or outcome from an attempt that is no longer current (requeued, retried) is ignored.
    fence: Mapped[int] = mapped_column(Integer, default=0)
    # The planner's plan of the stage (w2s.stages.StagePlan.to_record): what the worker runs.
    plan: Mapped[dict[str, Any] | None]
    gpu_class: Mapped[str | None] = mapped_column(String(32))
    memory_gb: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(200))
    gpu: Mapped[str | None] = mapped_column(String(200))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None]  # accuracy, auroc, latest loss ...
    result: Mapped[dict[str, Any] | None]  # the w2s StageResult record
    error: Mapped[str | None] = mapped_column(Text)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    queued_at: Mapped[dt.datetime | None]
    # When its task was last sent to the broker (or is due back, for a retry with backoff).
    sent_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    heartbeat_at: Mapped[dt.datetime | None]
    # Hard time limit of one attempt (the job's or the team's, set at planning, tightened at each
    # claim) and the current attempt's end: past it (and a grace) the stage fails, wherever it runs.
    time_limit_s: Mapped[int | None] = mapped_column(Integer)
    deadline_at: Mapped[dt.datetime | None]
    # Preemption and drain (service/preemption.py): the running attempt is asked to write a checkpoint
    # and yield its slot; past the grace period it is stopped. How often it was preempted, and when
    # last (a stage is not preempted twice within W2S_PREEMPT_WINDOW_S).
    yield_requested_at: Mapped[dt.datetime | None]
    yield_reason: Mapped[str | None] = mapped_column(Text)
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_preempted_at: Mapped[dt.datetime | None]
    # The step of the stage key's last resume checkpoint (w2s.resume): the next attempt goes on from it.
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="stages", foreign_keys=[job_id])


class StageEvent(Base):
    """What happened to a stage between its status changes, for its timeline and the admin's counts:
    checkpoints written, preemptions asked and done, resumes, drains."""

    __tablename__ = "stage_events"
    __table_args__ = (
        Index("ix_stage_events_stage_id", "stage_id", "id"),
        Index("ix_stage_events_team_kind_at", "team_id", "kind", "at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    stage_id: Mapped[str] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"))
    team_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # service/states.py StageEventKind
    step: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


class MetricPoint(Base):
    __tablename__ = "metric_points"
    # Unique: a redelivered stage's points replace the lost attempt's (see worker/tasks.py).
    __table_args__ = (UniqueConstraint("stage_id", "name", "step", name="uq_metric_points_stage_name_step"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    stage_id: Mapped[str] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class MetricSeries(Base):
    """Exact figures of one curve of a stage, whose points are downsampled as written (w2s/curves.py)."""

    __tablename__ = "metric_series"

    stage_id: Mapped[str] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    points_seen: Mapped[int] = mapped_column(BigInteger)  # training steps that reported it
    min_value: Mapped[float] = mapped_column(Float)
    max_value: Mapped[float] = mapped_column(Float)
    last_step: Mapped[int] = mapped_column(Integer)
    last_value: Mapped[float] = mapped_column(Float)


class Worker(Base):
    """A worker process as it last reported itself: what it consumes and what it computes with."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSONType)
    runtime: Mapped[str] = mapped_column(String(16))  # w2s.stages.runtime_id()
    versions: Mapped[dict[str, Any]]  # w2s.stages.runtime_fingerprint(), for messages
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # `w2s-service drain`: the worker hands its stages back (checkpointed) and stops taking new ones.
    draining_since: Mapped[dt.datetime | None]


class JobExport(Base):
    """A succeeded job's export to one tracking tool (service/exports.py): due while pending and its
    due time has come and no attempt holds its lease; ``token`` fences a stale attempt out."""

    __tablename__ = "job_exports"
    __table_args__ = (
        UniqueConstraint("job_id", "target", name="uq_job_exports_job_target"),
        Index("ix_job_exports_due", "status", "due_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    target: Mapped[str] = mapped_column(String(16))  # mlflow | wandb
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # tries started
    due_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[dt.datetime | None]
    token: Mapped[str | None] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(String(200))
    run_url: Mapped[str | None] = mapped_column(String(1000))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]


class Artifact(Base):
    """Where a stage key's outputs live in the artifact store, who produced them and their size
    (a team's storage, service/storage.py)."""

    __tablename__ = "artifacts"
    __table_args__ = (Index("ix_artifacts_team_name", "team_id", "name", "created_at"),)

    stage_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)  # result | test_probs | soft_labels | ...
    uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # The team whose stage computed it; NULL: found already stored (computed outside the service).
    team_id: Mapped[str | None] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # A checkpoint no stage holds any more was removed from the store (service/checkpoints.py): no
    # cached completion may name it again, until a new run of the stage key stores a new one.
    removed_at: Mapped[dt.datetime | None]
    files_removed_at: Mapped[dt.datetime | None]  # ... and its file is gone from the store too


class CheckpointHold(Base):
    """A stage (of any team) whose result names a saved checkpoint: the file is removed only when no
    stage holds it. A team is charged for, and keeps its last N of, the checkpoints its stages hold."""

    __tablename__ = "checkpoint_holds"
    __table_args__ = (
        Index("ix_checkpoint_holds_team_created", "team_id", "created_at"),
        Index("ix_checkpoint_holds_stage_key", "stage_key"),
    )

    stage_id: Mapped[str] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(32))
    stage_key: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)  # as artifacts.uri: <store>#files/checkpoints/<ref> (or #blobs/)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LogLine(Base):
    __tablename__ = "log_lines"
    __table_args__ = (Index("ix_log_lines_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage_id: Mapped[str | None] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)


class Dataset(Base):
    """A dataset a team uploaded; usable in specs as {"dataset": {"name": "upload:<id>"}}."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(Text)
    text_column: Mapped[str] = mapped_column(String(100))
    label_column: Mapped[str] = mapped_column(String(100))
    n_rows: Mapped[int] = mapped_column(Integer)
    balance: Mapped[dict[str, Any]]
    size_bytes: Mapped[int] = mapped_column(BigIntId)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TeamUsage(Base):
    """GPU-seconds a team used, per hour: fair share sums the last window's rows."""

    __tablename__ = "team_usage"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    hour: Mapped[dt.datetime] = mapped_column(primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class AuditEntry(Base):
    """One administrator action: who, what, on which object, with which values."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any] | None]


class WebSession(Base):
    """A dashboard sign-in. The cookie carries its id; signing out revokes it here, so a copied
    cookie stops working too."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
