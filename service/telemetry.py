"""Prometheus metrics of every process of the fleet, in one place.

- The API serves ``/metrics``. With several server processes (``W2S_API_WORKERS`` > 1) each writes
  its counters to ``PROMETHEUS_MULTIPROC_DIR`` (``w2s-service api`` sets it, as ``w2s-service worker``
  does for its pool: w2s_service.cli.prepare_multiprocess_metrics) and a scrape sums them all,
  whichever process answers; jobs and stages by status are read from the database at scrape.
- The dispatcher and each worker serve their own on ``W2S_METRICS_PORT`` (0: none): rounds, queue
  depth and admission latency; stage attempts and durations by queue and outcome, GPU memory peaks;
  artifact-store retries and outages (w2s.store reports them here through a hook).

Metric objects are created here once per process; the processes import what they record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# -- the dispatcher ----------------------------------------------------------------------------------
ROUNDS = Counter(
    "w2s_dispatch_rounds_total", "dispatch rounds run (skipped: another dispatcher's round)", ["outcome"]
)
ROUND_SECONDS = Histogram("w2s_dispatch_round_seconds", "duration of a dispatch round")
ADMITTED = Counter("w2s_stages_admitted_total", "stages admitted to a worker slot", ["queue"])
ADMISSION_WAIT = Histogram(
    "w2s_stage_admission_wait_seconds",
    "from a job's creation to its stage's admission",
    ["queue"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
QUEUE_DEPTH = Gauge("w2s_queue_ready_stages", "stages ready and waiting for a slot, per queue", ["queue"])

# -- workers -------------------------------------------------------------------------------------------
STAGE_ATTEMPTS = Counter("w2s_stage_attempts_total", "stage attempts by outcome", ["queue", "outcome"])
STAGE_SECONDS = Histogram(
    "w2s_stage_seconds",
    "duration of a stage attempt",
    ["queue", "outcome"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
)
GPU_MEMORY_PEAK = Gauge(
    "w2s_stage_gpu_memory_peak_bytes",
    "peak GPU memory of the last stage on this worker",
    multiprocess_mode="liveall",
)
STORE_RETRIES = Counter("w2s_store_retries_total", "artifact store calls tried again after a transient error")
STORE_OUTAGES = Counter(
    "w2s_store_unavailable_total", "artifact store calls given up after W2S_STORE_RETRY_S"
)


def _store_hook(event: str) -> None:
    (STORE_RETRIES if event == "retry" else STORE_OUTAGES).inc()


def install_store_hook() -> None:
    """Count the library's store retries and outages in this process's metrics."""
    from w2s import store

    if _store_hook not in store.RETRY_HOOKS:
        store.RETRY_HOOKS.append(_store_hook)


def serve(port: int) -> None:
    """Serve this process's metrics (all of a worker's processes, in multiprocess mode) on ``port``."""
    if port <= 0:
        return
    install_store_hook()
    try:
        start_http_server(port, registry=scrape_registry())
    except OSError as error:  # another process of this host has the port: run on, without them
        logger.warning("metrics not served on :%d (%s); set another W2S_METRICS_PORT", port, error)
        return
    logger.info("metrics on :%d/metrics", port)


def scrape_registry() -> Any:
    """What a scrape reports: every process's metrics in multiprocess mode, else this process's."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


class DatabaseCounts(Collector):
    """Jobs and stages by status (and queue), read from the database at scrape time: the same answer
    from any API process."""

    def __init__(self, rows: Any):
        self.rows = rows  # () -> (jobs: [(status, n)], stages: [(status, queue, n)])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("w2s_jobs", "jobs by status", labels=["status"])
        stages = GaugeMetricFamily("w2s_stages", "stages by status and queue", labels=["status", "queue"])
        try:
            job_rows, stage_rows = self.rows()
        except Exception as error:  # the database is down: still serve the process metrics
            logger.warning("metrics: no job counts: %s", str(error).splitlines()[0])
            job_rows, stage_rows = [], []
        for status, count in job_rows:
            jobs.add_metric([status], count)
        for status, queue, count in stage_rows:
            stages.add_metric([status, queue or "unplanned"], count)
        yield jobs
        yield stages


_database_counts: DatabaseCounts | None = None


def api_metrics(rows: Any) -> bytes:
    """The API's scrape: its processes' metrics and the database's job and stage counts."""
    global _database_counts
    registry = scrape_registry()
    if os.environ.get(MULTIPROC_ENV):
        registry.register(DatabaseCounts(rows))  # a fresh registry per scrape
    elif _database_counts is None:
        _database_counts = DatabaseCounts(rows)
        registry.register(_database_counts)
    else:
        _database_counts.rows = rows
    return generate_latest(registry)
