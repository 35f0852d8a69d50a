"""The job and stage state machines: the one place that says which status may follow which.

Job:   queued -> running -> succeeded | failed | cancelled; failed or cancelled -> queued (retry).
Stage: pending -> queued -> running -> succeeded | failed | cancelled, or cached when its stage key
       already has a result; failed or cancelled -> pending (retry). A running stage may start
       running again (the broker redelivered it after its worker died), go back to queued (a
       transient error; the task retries with backoff, keeping its slot), or to pending (it ran
       out of GPU memory and waits for a slot in the next larger GPU class, or it yielded its slot to
       a preemption or a drain and waits to resume from its checkpoint).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class StageStatus(StrEnum):
    pending = "pending"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    cached = "cached"


class StageEventKind(StrEnum):
    """What the stage_events table records (service/lifecycle.py writes them)."""

    checkpoint = "checkpoint"  # a resume checkpoint was written at a step
    resumed = "resumed"  # an attempt went on from a checkpoint
    preempt_asked = "preempt_asked"  # the dispatcher asked the attempt to yield its slot to other work
    drain_asked = "drain_asked"  # its worker is draining: asked to checkpoint and hand the stage back
    yielded = "yielded"  # it wrote its checkpoint and gave its slot back; it waits to resume
    forced = "forced"  # it did not yield within the grace period: stopped and requeued


class YieldReason(StrEnum):
    """Why a running attempt is asked to yield (stages.yield_reason)."""

    preempt = "preempt"
    drain = "drain"


class ExportStatus(StrEnum):
    """A succeeded job's export to a tracking tool (service/exports.py): pending until a try lands
    (succeeded) or the tries are spent (failed); asked again, it is pending once more."""

    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset(
        {JobStatus.running, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
    ),
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset({JobStatus.queued}),
    JobStatus.cancelled: frozenset({JobStatus.queued}),
}

STAGE_TRANSITIONS: dict[StageStatus, frozenset[StageStatus]] = {
    StageStatus.pending: frozenset(
        {StageStatus.queued, StageStatus.cached, StageStatus.cancelled, StageStatus.failed}
    ),
    StageStatus.queued: frozenset(
        {
            StageStatus.running,
            StageStatus.cached,
            StageStatus.cancelled,
            StageStatus.failed,
            StageStatus.pending,
        }
    ),
    StageStatus.running: frozenset(
        {
            StageStatus.pending,  # out of memory (a larger GPU class), or yielded (preempted, drained)
            StageStatus.running,
            StageStatus.queued,
            StageStatus.succeeded,
            StageStatus.cached,
            StageStatus.failed,
            StageStatus.cancelled,
        }
    ),
    StageStatus.succeeded: frozenset(),
    StageStatus.cached: frozenset(),
    StageStatus.failed: frozenset({StageStatus.pending}),
    StageStatus.cancelled: frozenset({StageStatus.pending}),
}

JOB_TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
JOB_OPEN = frozenset({JobStatus.queued, JobStatus.running})  # work is due or in flight
JOB_CANCELLABLE = frozenset(s for s, targets in JOB_TRANSITIONS.items() if JobStatus.cancelled in targets)
JOB_RETRYABLE = frozenset(s for s, targets in JOB_TRANSITIONS.items() if JobStatus.queued in targets)
STAGE_DONE = frozenset({StageStatus.succeeded, StageStatus.cached})  # has a result
STAGE_ACTIVE = frozenset({StageStatus.queued, StageStatus.running})  # holds a slot
STAGE_WAITING = frozenset({StageStatus.pending, StageStatus.queued})  # stops at once when its job ends
STAGE_UNFINISHED = frozenset(StageStatus) - STAGE_DONE  # counts in jobs.stages_left
# Counted against a team's backlog limit (max_queued_stages).
STAGE_BACKLOG = frozenset({StageStatus.pending, StageStatus.queued, StageStatus.running})


def is_terminal(job_status: str) -> bool:
    return job_status in JOB_TERMINAL


def can_cancel(job_status: str) -> bool:
    return job_status in JOB_CANCELLABLE


def can_retry(job_status: str) -> bool:
    return job_status in JOB_RETRYABLE


def has_result(stage_status: str) -> bool:
    return stage_status in STAGE_DONE


def sql_in(column: str, statuses: frozenset[Any]) -> str:
    """``column IN ('a', 'b')`` for a set of statuses, for the partial indexes and the due queries."""
    return f"{column} IN ({', '.join(repr(str(s)) for s in sorted(statuses))})"


# What is due, as SQL over a row's own columns: the dispatcher's queries and the partial indexes that
# serve them use these very strings (a partial index is used only for its own predicate). Migrations
# copy them as literals, since a migration must not change when this module does.
JOB_PLAN_DUE = f"{sql_in('status', JOB_OPEN)} AND NOT planned"
JOB_FINISH_DUE = f"{sql_in('status', JOB_OPEN)} AND planned AND stages_left = 0"
STAGE_READY = f"status = '{StageStatus.pending}' AND ready"


class InvalidTransition(Exception):
    """A status change the state machine does not allow (the API answers 409)."""

    def __init__(self, what: str, current: str, new: str, allowed: frozenset[Any]):
        choices = ", ".join(sorted(allowed)) or "none: it is final"
        verb = {"cancelled": "cancel", "queued": "retry"}.get(str(new))
        reason = f"cannot {verb} a {current} {what}" if verb else f"{what} cannot go from {current} to {new}"
        super().__init__(f"{reason} (from {current} it may go to: {choices})")
        self.current, self.new = current, new


def check_job_transition(current: str, new: str) -> JobStatus:
    allowed = JOB_TRANSITIONS[JobStatus(current)]
    if JobStatus(new) not in allowed:
        raise InvalidTransition("job", current, new, allowed)
    return JobStatus(new)


def check_stage_transition(current: str, new: str) -> StageStatus:
    allowed = STAGE_TRANSITIONS[StageStatus(current)]
    if StageStatus(new) not in allowed:
        raise InvalidTransition("stage", current, new, allowed)
    return StageStatus(new)
