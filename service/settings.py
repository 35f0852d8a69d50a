"""The one settings object of the service, read from the environment with the prefix ``W2S_``.

With nothing set, everything is embedded: SQLite and a filesystem Celery transport under ``.w2s/``,
so one command runs the whole service on a laptop. Production sets ``W2S_DATABASE_URL``
(Postgres) and ``W2S_BROKER_URL`` (Redis).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from w2s.settings import LibrarySettings, default_home, project_root

# Published development values: they work only with W2S_ENVIRONMENT=development.
DEV_ADMIN_KEY = "dev-admin-key"
DEV_SESSION_SECRET = "dev-session-secret"
# GPU memory classes, smallest first; a stage goes to the smallest class its estimate fits.
DEFAULT_GPU_CLASSES = {"gpu-24g": 24.0, "gpu-80g": 80.0}


class Settings(LibrarySettings):
    environment: str = Field(
        "",
        description="development | production; only development lets the built-in development "
        "admin key and session secret work (`w2s-service dev` sets it)",
    )
    state_dir: Path = Field(
        default_factory=default_home,
        description="where the embedded database, broker and uploads live (default: the checkout's .w2s/)",
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite in state_dir")
    broker_url: str = Field("", description="Celery broker URL; empty = filesystem transport in state_dir")
    broker_key_prefix: str = Field("", description="prefix for every Redis key, to share one Redis safely")
    admin_key: str = Field(
        "",
        description="bearer key of the administrator; unset: admin endpoints are off "
        "(development: dev-admin-key)",
    )
    session_secret: str = Field(
        "",
        description="signs the dashboard's session cookie; the API needs it "
        "(development: dev-session-secret)",
    )
    allow_trust_remote_code: bool = Field(False, description="let specs run model code from the hub")
    # Slots per queue the dispatcher may fill: one per worker process (one per GPU).
    queue_slots: dict[str, int] = Field(default_factory=lambda: {"cpu": 1})
    gpu_classes: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_GPU_CLASSES))
    default_gpu_quota: int = Field(4, ge=0, description="concurrent GPU stages per team unless set")
    max_stage_attempts: int = Field(3, ge=1, description="a stage that fails this often stops")
    stage_timeout_s: int = Field(
        6 * 3600,
        description="Redis redelivers a stage task not acknowledged after this (plus 10 min); keep it above "
        "the longest stage time limit any team has",
    )
    fair_share_window_h: float = Field(24.0, description="GPU-seconds this recent count for fair share")
    # Preemption (service/scheduler.py has the rules): a running stage writes a checkpoint and yields
    # its slot to a team below its fair share, or to a higher-priority job of its own team.
    preemption: bool = Field(
        True, description="preempt over-share and lower-priority stages for waiting work"
    )
    preempt_grace_s: float = Field(
        60.0,
        gt=0,
        description="how long a stage asked to yield (preempted, drained) has to write its checkpoint and "
        "stop; then it is stopped and requeued, resuming from its last periodic checkpoint",
    )
    preempt_min_run_s: float = Field(
        120.0, ge=0, description="a stage's attempt runs at least this long before it may be preempted"
    )
    preempt_window_s: float = Field(
        900.0, ge=0, description="a stage is not preempted again within this long of its last preemption"
    )
    dispatch_interval_s: float = Field(0.5, gt=0)
    max_upload_mb: int = Field(50, ge=1)
    data_url: str = Field(
        "",
        description="registry datasets from object storage (s3://bucket/data, as <name>/<split>.jsonl): "
        "every host reads the same files, fetching what a job needs into its own cache; empty = "
        "W2S_DATA_DIR (a directory, or a read-only mount shared by every host)",
    )
    uploads_dir: Path = Field(
        Path(""),
        description="where an upload is spooled while it is checked (its bytes are then kept in the "
        "artifact store, which every host reads); empty = state_dir/uploads",
    )
    progress_flush_s: float = Field(2.0, description="how often workers write progress to the database")
    metric_points_per_series: int = Field(
        2_000,
        ge=10,
        le=100_000,
        description="points kept of each training curve of a stage, downsampled as written (LTTB); "
        "exact minimum, maximum and last value are kept beside them",
    )
    upload_part_max_age_s: float = Field(
        900.0,
        gt=0,
        description="an unfinished upload file (.part) untouched this long is removed, at API start "
        "and then every few minutes",
    )
    # The stage worker's long-lived process (worker/tasks.py, worker/isolation.py): probe stages run
    # in it and reuse what it has loaded; full and LoRA stages each get a fresh process of their own.
    worker_max_stages_per_process: int = Field(
        1000,
        ge=1,
        description="stages a worker's long-lived process runs before Celery replaces it with a fresh "
        "one (bounds slow leaks; its caches are rebuilt from the store)",
    )
    worker_max_memory_mb: int = Field(
        8192,
        ge=256,
        description="resident memory of a worker's long-lived process above which it is replaced after "
        "its current stage",
    )
    stage_cache_mb: int = Field(
        1024,
        ge=0,
        description="probe features and other stored arrays a worker's long-lived process keeps in "
        "memory for the next stages (least recently used first out; 0: none)",
    )
    # Control tasks (planning and finishing a job, worker/control.py).
    control_timeout_s: float = Field(
        600.0, gt=0, description="longest a job's planning or finishing may take"
    )
    max_control_attempts: int = Field(
        3,
        ge=1,
        description="a job whose planning or finishing task starts and is lost (its worker killed or "
        "stuck) this often fails; sends no worker took do not count",
    )
    control_lease_s: float = Field(
        15.0,
        gt=0,
        description="a planning or finishing task not claimed (or, running, not renewed) within this "
        "long is sent again: a dispatcher or control worker lost between commit and send costs this",
    )
    claim_lease_s: float = Field(
        15.0,
        gt=0,
        description="a stage sent to a worker and not claimed within this long is sent once more, then "
        "every redeliver_after_s: a send lost between the dispatcher's commit and the broker costs this",
    )
    dispatch_batch: int = Field(
        20, ge=1, description="teams whose next planning or finishing task the dispatcher sends per round"
    )
    control_concurrency: int = Field(
        2,
        ge=1,
        description="processes of the control worker: one team's long planning leaves the others free",
    )
    # Limits; a team's own values (set by an admin) override these.
    max_queued_stages: int = Field(50_000, ge=1, description="stages a team may have waiting or running")
    max_stages_per_job: int = Field(2_000, ge=1, description="stages one job may have")
    max_stages_per_sweep: int = Field(25_000, ge=1, description="stages one sweep may have")
    upload_quota_mb: int = Field(2_048, ge=1, description="uploaded data a team may keep")
    max_uploads: int = Field(
        200, ge=1, description="uploaded datasets a team may keep at once (whatever their size)"
    )
    storage_quota_mb: int = Field(
        51_200,
        ge=1,
        description="bytes a team may hold in the artifact store and uploads together (stage outputs, "
        "checkpoints, uploaded datasets); a job or upload that would go over it is refused",
    )
    checkpoints_kept: int = Field(
        5,
        ge=1,
        description="saved checkpoints (save_checkpoint: true) of a team's stages it keeps, newest first; "
        "its stages let go of older ones, which are deleted once no team's stage holds them",
    )
    stage_time_limit_s: int = Field(
        6 * 3600,
        ge=1,
        description="longest one attempt of a stage may run (a team's own limit overrides it; a job may "
        "ask for less); past it the stage fails saying so",
    )
    requests_per_minute: int = Field(1_200, ge=1, description="API requests per key per minute")
    auth_failures_per_minute: int = Field(
        30,
        ge=1,
        description="failed API authentications one client address (or one key prefix) may make per "
        "minute; more get 429 until the minute ends",
    )
    signin_failures_free: int = Field(
        5,
        ge=1,
        description="failed dashboard sign-ins from one address per 15 minutes before each further one "
        "waits twice as long (1 s, 2 s, 4 s ... up to 5 min)",
    )
    max_streams_per_team: int = Field(
        20, ge=1, description="live metric streams (SSE) a team may hold open at once, over all API processes"
    )
    stream_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often live streams get new points; one database read per tick"
    )
    max_priority: int = Field(100, ge=-100, le=100, description="highest job priority a team may ask for")
    # Where models may come from, besides hub ids: directories under these roots.
    model_roots: list[Path] = Field(
        default_factory=lambda: [(project_root() or default_home()) / "models"],
        description="directories whose subdirectories jobs may name as models (JSON list; default: "
        "the checkout's models/, where `w2s models prepare-offline models` puts them)",
    )
    path_base: Path = Field(
        default_factory=lambda: project_root() or default_home(),
        description="relative paths in requests (./models/x) are resolved against this directory, the "
        "same in every process and on every host, and then against each root; never against a "
        "process's working directory (default: the checkout, where models/ is)",
    )
    log_format: str = Field(
        "text",
        pattern="^(text|json)$",
        description="text, or json: one JSON object per line with job and stage ids",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="the dispatcher and each worker serve Prometheus metrics on this port (0: none); "
        "the API serves them at /metrics",
    )
    metrics_public: bool = Field(False, description="serve /metrics without the admin key")
    # Recovery from lost workers and lost broker messages (see worker/tasks.py and service/dispatch.py).
    heartbeat_interval_s: float = Field(10.0, gt=0, description="how often a running stage says it is alive")
    heartbeat_timeout_s: float = Field(
        120.0, gt=0, description="a running stage silent this long lost its worker: it is requeued"
    )
    redeliver_after_s: float = Field(
        300.0, gt=0, description="a queued stage no worker took this long is sent again (the broker lost it)"
    )
    retry_backoff_s: float = Field(
        5.0,
        gt=0,
        description="first wait before retrying a stage after a transient error; doubles, up to 5 min",
    )
    db_retry_s: float = Field(
        600.0, ge=0, description="how long a worker keeps retrying a database write before giving up"
    )
    # Exports of finished jobs to the tracking tools researchers use (service/exports.py). A team's own
    # settings (w2s-service team-set) override these; credentials are only ever environment variables.
    mlflow_tracking_uri: str | None = Field(
        None,
        description="export every succeeded job to this MLflow tracking server (http(s)://, file:, "
        "databricks); a team's own URI overrides it",
    )
    export_experiment: Literal["team", "sweep"] = Field(
        "team",
        description="MLflow experiment of an exported job: w2s/<team> for every job, or (sweep) "
        "w2s/<team>/<sweep name> for a sweep's jobs",
    )
    wandb_project: str | None = Field(
        None,
        description="export every succeeded job to this Weights & Biases project (a team's overrides it)",
    )
    wandb_entity: str | None = Field(None, description="the W&B entity (user or team) of the project")
    wandb_mode: Literal["online", "offline"] = Field(
        "online",
        description="offline: write run files under wandb_dir for `wandb sync` instead of uploading",
    )
    wandb_dir: Path = Field(
        Path(""),
        description="where W&B run files are written (offline runs stay there); empty = state_dir/wandb",
    )
    export_max_attempts: int = Field(
        8, ge=1, description="tries of one export before it is marked failed (a tracking server down)"
    )
    export_retry_s: float = Field(
        30.0, gt=0, description="first wait before an export is tried again; doubles, up to 30 min"
    )
    export_lease_s: float = Field(
        900.0, ge=120, description="an export task not done within this long (its worker lost) is sent again"
    )
    # Exports run on a queue and worker of their own (`w2s-service worker --queue exports`): a tracking
    # server that accepts connections and never answers holds export slots, never planning or finishing.
    exports_per_team: int = Field(
        2,
        ge=1,
        description="exports of one team in flight at once; the dispatcher leases no more, so one team's "
        "dead tracking server holds at most this many of the export worker's processes",
    )
    export_concurrency: int = Field(
        4, ge=1, description="processes of the exports worker (keep it above exports_per_team)"
    )
    export_request_timeout_s: int = Field(
        30,
        ge=1,
        description="connect and read timeout of each request an export makes to MLflow or W&B (set for "
        "the export's call only; MLFLOW_HTTP_REQUEST_TIMEOUT in the environment does not change it)",
    )
    export_request_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="retries of one such request within a try; the export's own back-off "
        "(export_retry_s) is the patient one",
    )
    # `w2s-service api`: a process uses one core (about 900 reads/s); run one per core it may use.
    api_workers: int = Field(1, ge=1, description="API server processes (uvicorn workers)")
    api_keep_alive_s: int = Field(
        75,
        ge=1,
        description="how long the API keeps an idle client connection open; longer than the idle "
        "timeout of clients and proxies (60 s is common), or a request can meet a connection "
        "the server is just closing",
    )

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # Absolute, so every process finds the same state whatever its working directory.
        self.state_dir = self.state_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.state_dir / 'service.db').resolve()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.uploads_dir == Path(""):
            self.uploads_dir = self.state_dir / "uploads"
        if self.wandb_dir == Path(""):
            self.wandb_dir = self.state_dir / "wandb"
        return self

    @model_validator(mode="after")
    def _heartbeats_fit_the_timeout(self) -> Settings:
        if self.heartbeat_timeout_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                "W2S_HEARTBEAT_TIMEOUT_S must be at least 3 x W2S_HEARTBEAT_INTERVAL_S, or one slow "
                "heartbeat would requeue a healthy stage"
            )
        return self

    @model_validator(mode="after")
    def _development_secrets_in_development_only(self) -> Settings:
        if self.environment == "development":
            self.admin_key = self.admin_key or DEV_ADMIN_KEY
            self.session_secret = self.session_secret or DEV_SESSION_SECRET
            return self
        for name, value, dev_value in (
            ("W2S_ADMIN_KEY", self.admin_key, DEV_ADMIN_KEY),
            ("W2S_SESSION_SECRET", self.session_secret, DEV_SESSION_SECRET),
        ):
            if value == dev_value:
                raise ValueError(
                    f"{name} is the published development value; set a secret of your own, or set "
                    "W2S_ENVIRONMENT=development on a machine nobody else can reach"
                )
        return self

    @property
    def device_kind(self) -> str:
        """What stages run on: CUDA when the deployment has GPU queues (every stage is routed to
        one, see service.scheduler.route_queue), else the CPU. Stage keys include it."""
        return "cuda" if any(name in self.queue_slots for name in self.gpu_classes) else "cpu"

    @property
    def probe_head_device_kind(self) -> str | None:
        """Where probe heads train whose features an earlier stage computes: on the CPU queue when
        the deployment has one beside its GPU queues (a GPU computes the features, then a CPU worker
        trains the head in a second or so and the GPU goes to work that needs it); else None."""
        return "cpu" if self.device_kind == "cuda" and self.queue_slots.get("cpu", 0) > 0 else None

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return (self.state_dir / "broker").resolve()

    @property
    def store_uri(self) -> str:
        return self.artifact_store


@lru_cache
def get_settings() -> Settings:
    return Settings()
