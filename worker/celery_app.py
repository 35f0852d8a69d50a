"""The Celery app, built from the service settings.

One worker process per GPU (``CUDA_VISIBLE_DEVICES``), concurrency 1, prefetch 1, late acks. Its
pool child is long-lived: it runs probe stages itself and gives each full or LoRA stage a fresh
process of its own, so that stage's GPU memory is returned when it ends (worker/tasks.py,
worker/isolation.py); Celery replaces the child after ``W2S_WORKER_MAX_STAGES_PER_PROCESS`` stages
or once it holds ``W2S_WORKER_MAX_MEMORY_MB``. Queues are listed explicitly and unknown queues are an
error, so a typo fails loudly instead of parking work.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.settings import Settings, get_settings
from worker import embedded_broker

STAGE_TASK = "w2s.run_stage"
PLAN_TASK = "w2s.plan_job"
FINISH_TASK = "w2s.finish_job"
EXPORT_TASK = "w2s.export_job"  # a succeeded job to MLflow or W&B (worker/exports.py)
# Planning and finishing jobs (worker/control.py) run on their own queue and worker.
CONTROL_QUEUE = "control"
# Exports (worker/exports.py) too: a tracking server that never answers holds export processes
# only, never planning or finishing. The control worker still runs an export sent to its queue by
# a dispatcher from before this queue existed (every worker knows every task).
EXPORTS_QUEUE = "exports"


def broker_options(settings: Settings) -> dict[str, object]:
    if settings.embedded_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control", "claimed", "broken"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # Producer and consumer share one folder: what the API writes, the worker reads. Messages
        # are written whole and claimed by rename (worker/embedded_broker.py), so no reader tears one.
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "claim_folder": str(folder / "claimed"),
            "broken_folder": str(folder / "broken"),
            "store_processed": False,
            # How often a worker lists the queue folder (kombu's default: 1 s, which set the pace of
            # a stream of short stages: one per second however fast each ran).
            "polling_interval": 0.05,
        }
    # Redis redelivers an unacknowledged task after this long: it must exceed the longest stage,
    # or a healthy long stage would be started twice (a team given a longer time limit than both
    # needs W2S_STAGE_TIMEOUT_S raised with it; docs/deployment.md).
    longest = max(settings.stage_timeout_s, settings.stage_time_limit_s)
    options: dict[str, object] = {"visibility_timeout": longest + 600}
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def queue_names(settings: Settings) -> list[str]:
    fixed = {"cpu", CONTROL_QUEUE, EXPORTS_QUEUE}
    return sorted(set(settings.queue_slots) | set(settings.gpu_classes) | fixed)


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    # filesystem:// means the embedded broker: kombu's filesystem transport with atomic writes.
    broker = f"{embedded_broker.ALIAS}://" if settings.embedded_broker else settings.broker_url
    app = Celery("w2s", broker=broker, include=["worker.tasks", "worker.control", "worker.exports"])
    limit = settings.control_timeout_s
    app.conf.update(
        task_routes={
            PLAN_TASK: {"queue": CONTROL_QUEUE},
            FINISH_TASK: {"queue": CONTROL_QUEUE},
            EXPORT_TASK: {"queue": EXPORTS_QUEUE},
        },
        # The soft limit raises inside the task, which fails the job; the hard limit kills a task
        # stuck where the soft one cannot reach (native code), and the dispatcher resends it.
        task_annotations={
            **{
                name: {"soft_time_limit": limit, "time_limit": limit + 30}
                for name in (PLAN_TASK, FINISH_TASK)
            },
            # An export talks to a server outside: bounded by its lease, so a stuck one is sent again.
            EXPORT_TASK: {
                "soft_time_limit": settings.export_lease_s - 60,
                "time_limit": settings.export_lease_s - 30,
            },
        },
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, routing_key=name) for name in queue_names(settings)],
        task_create_missing_queues=False,
        task_default_queue="cpu",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=settings.worker_max_stages_per_process,
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024,  # KiB
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery()
