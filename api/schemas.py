"""Request and response schemas. Secrets never appear in a ``*Public`` schema."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.jobs import UPLOAD_PREFIX
from service.states import JobStatus, has_result
from service.team_names import TEAM_NAME_MAX, check_team_name
from w2s.safe_text import check_name


def _printable_name(value: str, info: ValidationInfo) -> str:
    return check_name(value, str(info.field_name))


# Every name a person gives (job, sweep, upload, key, columns, export targets): stored and printed in
# other people's terminals and pages, so no control, bidi or invisible characters (w2s/safe_text.py).
SafeName = Annotated[str, AfterValidator(_printable_name)]


def body_location(dotted: str) -> list[str | int]:
    """A spec error's dotted field ("weak_models.1.mode") as a request body location: list indexes
    become ints. Only ASCII digits do: "¹" is a digit to str.isdigit and not to int()."""
    return ["body", *(int(part) if part.isascii() and part.isdigit() else part for part in dotted.split("."))]


class ErrorItem(BaseModel):
    """One problem with a request: where (``loc``, e.g. ``["body", "weak", "lr"]``) and what to fix."""

    model_config = ConfigDict(extra="allow")  # pydantic's errors also carry input, ctx, url

    loc: list[str | int] = Field(default_factory=list)
    msg: str
    type: str
    line: int | None = Field(None, description="the line of an uploaded file, for dataset errors")


class ErrorPublic(BaseModel):
    """The body of every error response: a message, or a list of problems each naming its field."""

    detail: str | list[ErrorItem]


ERROR_DESCRIPTIONS = {
    400: "the request body is not what the endpoint reads",
    401: "missing or invalid API key",
    403: "the endpoint needs the admin key",
    404: "no such object for your team (another team's objects are not found either)",
    409: "the object is not in a state that allows this",
    413: "the body is over the size limit",
    422: "invalid input: each problem names its field and how to fix it; or over a size limit",
    429: "over a rate or backlog limit: the body names it; retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes, all with the :class:`ErrorPublic` body."""
    return {code: {"model": ErrorPublic, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


class JobCreate(BaseModel):
    """The w2s job spec plus optional ``name`` and ``priority``."""

    # strict: a JSON false is not a priority of 0 (the spec itself is validated by w2s.spec).
    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={
            "example": {
                "name": "minilm-to-mpnet-sst2",
                "priority": 0,
                "dataset": {"name": "sst2", "n_train": 4000, "seed": 0},
                "weak": {"model": "./models/all-MiniLM-L6-v2", "mode": "probe"},
                "strong": {"model": "./models/all-mpnet-base-v2", "mode": "probe"},
                "losses": ["xent", {"name": "logconf", "aux_coef": 0.5}, "product"],
                "seeds": [0, 1, 2],
            }
        },
    )

    name: SafeName = Field("", max_length=200)
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    stage_time_limit_s: int | None = Field(
        None,
        ge=1,
        le=30 * 86_400,
        description="longest one attempt of a stage may run before it fails (default and maximum: the "
        "team's limit)",
    )

    def spec(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StageEventPublic(BaseModel):
    """A checkpoint written, a preemption or drain asked, a yield, a resume (StageEventKind)."""

    model_config = ConfigDict(from_attributes=True)

    at: dt.datetime
    kind: str
    step: int | None
    detail: str | None


class StagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    seed: int
    status: str
    attempts: int
    stage_key: str | None
    gpu_class: str | None
    memory_gb: float | None = Field(None, description="estimated GPU memory need, used for routing")
    worker: str | None
    gpu: str | None
    step: int
    total_steps: int | None
    progress: float | None = Field(None, description="fraction of training steps done")
    metrics: dict[str, Any] | None
    error: str | None
    gpu_seconds: float
    queued_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    duration_s: float | None = None
    checkpoint_step: int | None = Field(
        None, description="its last resume checkpoint: a new attempt goes on from it"
    )
    preemptions: int = Field(0, description="times it yielded its slot to other work and resumed")
    yield_requested_at: dt.datetime | None = Field(
        None, description="set while it is asked to checkpoint and yield (preempted, or its worker drains)"
    )
    events: list[StageEventPublic] = Field(
        default_factory=list, description="checkpoints, preemptions, drains and resumes, oldest first"
    )


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: str
    priority: int
    stage_time_limit_s: int | None = Field(None, description="as asked; the team's limit applies if none")
    error: str | None
    dataset: str
    weak_model: str
    strong_model: str
    sweep_id: str | None
    spec: dict[str, Any]
    results: dict[str, Any] | None = Field(None, description="the w2s results document")
    gpu_seconds: float
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    stages: list[StagePublic]


class ExportCreate(BaseModel):
    to: Literal["mlflow", "wandb"] = Field(description="the tracking tool: mlflow or wandb")


class ExportPublic(BaseModel):
    """A job's export to a tracking tool (MLflow or W&B): retried with back-off while the tool is
    unreachable; the job never waits for it."""

    model_config = ConfigDict(from_attributes=True)

    target: str = Field(description="mlflow or wandb")
    status: str = Field(description="pending (due or waiting to try again), succeeded, or failed")
    attempts: int = Field(description="tries started")
    due_at: dt.datetime = Field(description="while pending: when the next try is due")
    run_id: str | None = Field(description="the run in the tracking tool (MLflow run id, W&B run path)")
    run_url: str | None = Field(description="a link to the run, where the tool has one")
    error: str | None = Field(description="why the last try failed")
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None


class JobSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    team_id: str = Field(description="the team that owns it (admin listings span teams)")
    name: str
    status: str
    priority: int
    dataset: str
    weak_model: str
    strong_model: str
    created_at: dt.datetime
    started_at: dt.datetime | None = Field(
        description="when it first started running: its first stage got a worker slot or a cached result"
    )
    finished_at: dt.datetime | None
    duration_s: float | None = Field(
        description="run time: started_at to finished_at, or to now while it runs; null before it starts "
        "(the wait for planning and a first slot is not in it: created_at says when it was submitted)"
    )
    progress: float = Field(
        description="fraction of its work done: a step per stage with a result, and a last one for the "
        "results document; 1 only once it succeeded"
    )


class JobsPublic(BaseModel):
    data: list[JobSummary]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class MetricSeries(BaseModel):
    stage_id: str
    kind: str
    seed: int
    name: str
    steps: list[int]
    values: list[float]
    reused: bool = Field(False, description="a cached stage's curve: from the run that computed its result")
    points_seen: int | None = Field(
        None, description="training steps that reported this metric; steps/values keep at most a few thousand"
    )
    min: float | None = Field(None, description="exact minimum over every step, also those not kept")
    max: float | None = Field(None, description="exact maximum over every step")
    last_step: int | None = Field(None, description="the latest step that reported it")
    last: float | None = Field(None, description="its value at last_step")


class MetricsPublic(BaseModel):
    job_id: str
    series: list[MetricSeries]


class LogLinePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: dt.datetime
    level: str
    stage_id: str | None
    message: str


class LogsPublic(BaseModel):
    data: list[LogLinePublic]


class TeamCreate(BaseModel):
    model_config = ConfigDict(strict=True)  # a JSON 0 is not false, nor "1" a weight

    name: Annotated[str, AfterValidator(check_team_name)] = Field(
        ...,
        min_length=1,
        max_length=100,
        description=f"ASCII letters, digits, '-', '_' and '.', 1 to {TEAM_NAME_MAX}, starting with a letter "
        "or digit (NFKC-normalised and stripped first); unique ignoring case",
    )
    weight: float = Field(1.0, gt=0, le=1000, description="fair-share weight")
    gpu_quota: int | None = Field(
        None, ge=0, le=10000, description="concurrent GPU stages (default from settings)"
    )
    allow_trust_remote_code: bool = False


class TeamPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    weight: float
    gpu_quota: int | None
    allow_trust_remote_code: bool
    created_at: dt.datetime


class TeamAdminPublic(TeamPublic):
    """A team as an administrator sees it: its limits (null = the setting) and whether it is disabled."""

    disabled_at: dt.datetime | None
    max_priority: int | None
    max_queued_stages: int | None
    max_stages_per_job: int | None
    max_stages_per_sweep: int | None
    upload_quota_mb: int | None
    max_uploads: int | None = None
    storage_quota_mb: int | None
    stage_time_limit_s: int | None
    requests_per_minute: int | None
    max_streams_per_team: int | None
    mlflow_tracking_uri: str | None = Field(
        None, description="where its jobs are exported (null: the setting)"
    )
    mlflow_token_env: str | None = Field(None, description="the workers' variable holding its MLflow token")
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_key_env: str | None = Field(None, description="the workers' variable holding its W&B API key")
    storage: StoragePublic | None = Field(None, description="what it holds now (listings)")
    preemptions_window: int = Field(
        0, description="times its running stages were preempted for other work, in the fair-share window"
    )


class TeamUpdate(BaseModel):
    """Fields an administrator may change; omitted fields stay, null restores the setting's value."""

    model_config = ConfigDict(strict=True, extra="forbid")

    weight: float | None = Field(None, gt=0, le=1000, description="fair-share weight")
    gpu_quota: int | None = Field(None, ge=0, le=10000, description="concurrent stages in flight")
    allow_trust_remote_code: bool | None = None
    max_priority: int | None = Field(None, ge=-100, le=100, description="highest job priority allowed")
    max_queued_stages: int | None = Field(None, ge=1, le=10_000_000)
    max_stages_per_job: int | None = Field(None, ge=1, le=1_000_000)
    max_stages_per_sweep: int | None = Field(None, ge=1, le=10_000_000)
    upload_quota_mb: int | None = Field(None, ge=1, le=10_000_000)
    max_uploads: int | None = Field(None, ge=1, le=1_000_000, description="uploaded datasets kept at once")
    storage_quota_mb: int | None = Field(
        None, ge=1, le=1_000_000_000, description="artifact store and uploads together, MB"
    )
    stage_time_limit_s: int | None = Field(None, ge=1, le=30 * 86_400, description="longest stage attempt")
    requests_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    max_streams_per_team: int | None = Field(None, ge=1, le=100_000, description="live metric streams open")
    # Where its succeeded jobs are exported; credentials only as the names of the control workers'
    # environment variables (service/exports.py), never the secrets themselves.
    mlflow_tracking_uri: SafeName | None = Field(None, max_length=500, description="an MLflow tracking URI")
    mlflow_token_env: SafeName | None = Field(
        None, max_length=100, description="a variable name, e.g. TEAM_A_MLFLOW"
    )
    wandb_project: SafeName | None = Field(None, max_length=200)
    wandb_entity: SafeName | None = Field(None, max_length=200)
    wandb_key_env: SafeName | None = Field(
        None, max_length=100, description="a variable name, e.g. TEAM_A_WANDB"
    )
    disabled: bool | None = Field(None, description="true: keys stop working and open jobs are cancelled")


class ApiKeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    team_id: str
    name: str
    prefix: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class AuditEntryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any] | None


class FindingPublic(BaseModel):
    """A job that breaks one of the lifecycle's invariants (service/doctor.py)."""

    job_id: str
    team_id: str
    job_status: str
    problem: str
    detail: str
    wedged: bool = Field(description="true: no dispatch round can repair it; false: overdue work")


class CheckupPublic(BaseModel):
    healthy: bool
    checked_jobs: int
    findings: list[FindingPublic]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(strict=True)

    name: SafeName = Field("", max_length=100, description="a label for listings")


class ApiKeyCreated(BaseModel):
    id: str
    team_id: str
    name: str
    prefix: str
    key: str = Field(description="shown once; only its hash is stored")


class StoragePublic(BaseModel):
    """Bytes a team holds: what its stages computed and its uploads, against storage_quota_mb."""

    used_bytes: int
    quota_bytes: int
    outputs_bytes: int = Field(description="stage results, test probabilities, soft labels")
    checkpoints_bytes: int = Field(description="saved weights (save_checkpoint); the last few are kept")
    uploads_bytes: int


class UsagePublic(BaseModel):
    team_id: str
    gpu_seconds_total: float = Field(
        description="device-seconds of every stage, on GPUs and CPUs alike (device_seconds splits them)"
    )
    device_seconds: dict[str, float] = Field(
        default_factory=dict, description="device-seconds by the kind of device the stages ran on: gpu, cpu"
    )
    gpu_seconds_window: float
    window_hours: float
    running_stages: int
    queued_stages: int
    pending_stages: int
    gpu_quota: int
    storage: StoragePublic
    preemptions_window: int = Field(
        0, description="times its running stages were preempted for other work, in the window (each resumed)"
    )


class DatasetUploadForm(BaseModel):
    """The form fields sent beside ``file`` in POST /v1/datasets."""

    name: SafeName = Field("", max_length=200, description="a label for listings (default: the file name)")
    text_column: SafeName = Field("text", min_length=1, max_length=100)
    label_column: SafeName = Field("label", min_length=1, max_length=100, description="0/1/true/false")
    format: Literal["jsonl", "csv"] | None = Field(None, description="inferred from the file name")

    @field_validator("format", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # HTML forms send an empty string for an untouched field.
        return value or None


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    text_column: str
    label_column: str
    n_rows: int
    balance: dict[str, Any] = Field(description='rows per label ("0", "1") and positive_fraction')
    size_bytes: int
    sha256: str
    created_at: dt.datetime
    spec_name: str = Field("", description="use as dataset.name in a job spec")

    @model_validator(mode="after")
    def _spec_name(self) -> DatasetPublic:
        self.spec_name = self.spec_name or f"{UPLOAD_PREFIX}{self.id}"
        return self


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class SweepCreate(BaseModel):
    """A grid on one dataset: every weak x strong pair becomes one job with all losses and seeds."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # a JSON false is not seed 0
        json_schema_extra={
            "example": {
                "name": "sst2-grid",
                "dataset": {"name": "sst2", "n_train": 4000, "seed": 0},
                "weak_models": ["./models/all-MiniLM-L6-v2", {"model": "gpt2", "mode": "probe"}],
                "strong_models": [{"model": "./models/all-mpnet-base-v2", "mode": "probe"}],
                "losses": ["xent", {"name": "logconf", "aux_coef": 0.5}],
                "seeds": [0, 1, 2],
            }
        },
    )

    name: SafeName = Field("", max_length=200)
    priority: int = Field(0, ge=-100, le=100)
    dataset: dict[str, Any]
    weak_models: list[dict[str, Any] | str] = Field(
        ..., min_length=1, max_length=20, description="model ids, or model specs with training options"
    )
    strong_models: list[dict[str, Any] | str] = Field(..., min_length=1, max_length=20)
    transfer: dict[str, Any] = Field(default_factory=dict)
    losses: list[Any] = Field(default_factory=lambda: ["xent"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=20)


class SweepRow(BaseModel):
    job_id: str
    weak_model: str
    strong_model: str
    weak_label: str = Field(
        description="the weak entry's label: the model's short name, plus the options that set it "
        "apart from other entries of the same model (e.g. 'all-MiniLM-L6-v2 weight_decay=0.1')"
    )
    strong_label: str = Field(description="the strong entry's label, as weak_label")
    status: str
    weak_accuracy: float | None
    ceiling_accuracy: float | None
    students: dict[str, dict[str, float | None]] = Field(description="per loss: accuracy and pgr")


class SweepPublic(BaseModel):
    id: str
    name: str
    created_at: dt.datetime
    status: str = Field(description="succeeded | failed | cancelled | running | queued")
    grid: dict[str, Any]
    jobs: list[str]
    table: list[SweepRow]
    pgr_summary: dict[str, dict[str, float | None]] = Field(
        description="per loss: mean, min, max PGR over the finished jobs (None when none)"
    )


class SweepSummary(BaseModel):
    id: str
    name: str
    created_at: dt.datetime
    status: str
    n_jobs: int


class SweepsPublic(BaseModel):
    data: list[SweepSummary]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    start = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
    end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
    return (end - start).total_seconds()


def run_seconds(
    started_at: dt.datetime | None, finished_at: dt.datetime | None, now: dt.datetime | None = None
) -> float | None:
    """A job's run time, the one every view shows (JobSummary.duration_s): started to finished, or to
    ``now`` while it runs; None before it starts."""
    if started_at is None:
        return None
    return _seconds(started_at, finished_at or now or dt.datetime.now(dt.UTC))


def job_progress(stages_done: float, n_stages: int, status: str) -> float:
    """JobSummary.progress: stages with a result (fractions of running ones too, for the dashboard's
    live bar) out of its stages plus one, the results document made at the end. A job that ended
    without results (cancelled, failed) never reads as complete, even when every stage finished."""
    return (stages_done + (status == JobStatus.succeeded)) / (n_stages + 1)


# The fields read off an ORM object or a database row, listed once: ``model_fields`` is a slow property,
# and ``model_validate(from_attributes)`` on a row pays for an exception per field the row lacks.
_STAGE_COLUMNS = tuple(
    name for name in StagePublic.model_fields if name not in ("progress", "duration_s", "events")
)
_JOB_COLUMNS = tuple(name for name in JobPublic.model_fields if name != "stages")
_SUMMARY_COLUMNS = tuple(name for name in JobSummary.model_fields if name not in ("progress", "duration_s"))


def stage_public(stage: Any, events: Sequence[Any] = ()) -> StagePublic:
    progress = min(1.0, stage.step / stage.total_steps) if stage.total_steps else None
    if has_result(stage.status):
        progress = 1.0
    return StagePublic(
        **{name: getattr(stage, name) for name in _STAGE_COLUMNS},
        progress=progress,
        duration_s=_seconds(stage.started_at, stage.finished_at),
        events=[StageEventPublic.model_validate(event) for event in events],
    )


def job_public(
    job: Any, stages: Sequence[Any] | None = None, events: dict[str, list[Any]] | None = None
) -> JobPublic:
    """From an ORM job, or from a row of its columns and its ``stages`` (service.jobs.job_detail);
    ``events``: each stage's timeline events (service.jobs.stage_events)."""
    data = {name: getattr(job, name) for name in _JOB_COLUMNS}
    stages = job.stages if stages is None else stages
    events = events or {}
    return JobPublic(**data, stages=[stage_public(stage, events.get(stage.id, ())) for stage in stages])


def job_summary(job: Any, now: dt.datetime | None = None) -> JobSummary:
    done = sum(has_result(stage.status) for stage in job.stages)
    return _summary(job, done, len(job.stages), now)


def summary_public(row: Any) -> JobSummary:
    """job_summary from a row of service.jobs.list_job_summaries (stage counts, not stages)."""
    return _summary(row, row.n_done, row.n_stages)


def _summary(job: Any, stages_done: int, n_stages: int, now: dt.datetime | None = None) -> JobSummary:
    data = {name: getattr(job, name) for name in _SUMMARY_COLUMNS}
    return JobSummary(
        **data,
        duration_s=run_seconds(job.started_at, job.finished_at, now),
        progress=job_progress(stages_done, n_stages, job.status),
    )
