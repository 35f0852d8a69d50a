"""A worker process reports itself to the registry (service/workers.py): its queues and its runtime
at start, then that it is alive every ``REPORT_EVERY_S``; the dispatcher routes stages by it.

The first report runs in the caller's thread, before Celery forks its pool. A report imports modules
(the runtime fingerprint, the database driver), and a process forked while another of its threads
holds a module's import lock inherits that lock held by a thread it does not have: the pool process
then hangs for good on its first import of that module (a stage received, never claimed). After the
first report everything a report needs is imported, so the reporting thread imports nothing.
The same holds for any lock that thread takes inside SQLAlchemy or psycopg, and Celery forks again
whenever a pool process is replaced: the thread does its database work holding ``FORK_GUARD``, which
every fork of this process takes first (``os.register_at_fork``), so no fork copies the thread
mid-call (a pool process forked 2 s after start, at a drain poll, hung once in a few suite runs).

Draining. The thread also looks every ``DRAIN_POLL_S`` whether an operator drained this worker
(`w2s-service drain`); then it stops the worker as SIGTERM does. On SIGTERM (Celery's warm shutdown:
no new task, the running ones finish) the worker first drains itself, so its running stages write a
checkpoint and hand themselves back within seconds instead of training on to their end.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from sqlalchemy.exc import DBAPIError

from service.db import session_scope
from service.workers import REPORT_EVERY_S, drain_worker, is_draining, register_worker, seen

logger = logging.getLogger(__name__)

# How often a worker looks whether it is being drained.
DRAIN_POLL_S = 2.0

# Held around the reporting thread's database calls and across every fork of this process (see the
# module's docstring). A fork waits at most for one short query.
FORK_GUARD = threading.Lock()
os.register_at_fork(
    before=FORK_GUARD.acquire, after_in_parent=FORK_GUARD.release, after_in_child=FORK_GUARD.release
)


class Registration(threading.Thread):
    def __init__(self, name: str, queues: list[str]):
        super().__init__(name="worker-registration", daemon=True)
        self.worker_name, self.queues = name, queues
        self.stopped = threading.Event()
        self.registered = False
        self.draining = False  # its stages were asked to yield (drain_on_shutdown ran)
        self.draining_noticed = False  # it saw an operator's drain and sent itself SIGTERM

    def start(self) -> None:
        """Register now, in this thread (see the module's docstring), then report in the background;
        drain on SIGTERM."""
        from celery.signals import worker_shutting_down

        self.report()
        worker_shutting_down.connect(self.drain_on_shutdown, weak=False)
        super().start()

    def drain_on_shutdown(self, **_: Any) -> None:
        """Celery's warm shutdown began (SIGTERM, or a drain): hand the running stages back."""
        if self.draining:
            return
        self.draining = True
        try:
            with session_scope() as session:
                asked = drain_worker(session, self.worker_name)
            logger.info(
                "%s shutting down: %d running stage(s) asked to checkpoint and yield",
                self.worker_name,
                len(asked),
            )
        except Exception:  # the dispatcher requeues them when the heartbeat stops, from their last checkpoint
            logger.warning("could not hand the running stages back before shutting down", exc_info=True)

    def report(self) -> None:
        from w2s.stages import runtime_fingerprint, runtime_id

        runtime = None if self.registered else (runtime_id(), runtime_fingerprint())
        try:
            with FORK_GUARD, session_scope() as session:
                if runtime is not None:
                    runtime_key, versions = runtime
                    register_worker(
                        session,
                        name=self.worker_name,
                        queues=self.queues,
                        runtime=runtime_key,
                        versions=versions,
                    )
                seen(session, self.worker_name)
            if not self.registered:
                self.registered = True
                logger.info("registered %s on %s, runtime %s", self.worker_name, self.queues, runtime_id())
        except DBAPIError as error:  # the next report tries again
            logger.warning("worker registration not written: %s", str(error).splitlines()[0])

    def run(self) -> None:
        last_report = time.monotonic()
        while not self.stopped.wait(DRAIN_POLL_S if self.registered else 1.0):
            if not self.registered or time.monotonic() - last_report >= REPORT_EVERY_S:
                self.report()
                last_report = time.monotonic()
            if self.registered and not self.draining_noticed and self._drained():
                logger.info(
                    "%s is drained: shutting down once its stages have handed themselves back",
                    self.worker_name,
                )
                # Celery's warm shutdown: it stops taking messages, then (worker_shutting_down) the
                # running stages are asked to yield, so none can come straight back to this worker.
                os.kill(os.getpid(), signal.SIGTERM)
                self.draining_noticed = True

    def _drained(self) -> bool:
        try:
            with FORK_GUARD, session_scope(read_only=True) as session:
                return is_draining(session, self.worker_name)
        except DBAPIError:
            return False
