"""Admission: which ready stages get the free worker slots. Pure functions, no database.

Order: across teams, the team with the fewest recent GPU-seconds per unit of fair-share weight
(stages it already has in flight count as an estimated cost, so one round of admissions interleaves
teams); within a team, higher job priority first, then the oldest job. Priority never crosses teams:
a team that sets priority 100 on everything still waits for its fair share. A team never has more
stages in flight than its quota (concurrent GPUs; on a CPU-only deployment, worker slots), and a
stage whose key is already queued or running elsewhere waits for that result instead of computing
it twice.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

# What one in-flight stage counts for in fair share before its real GPU-seconds are known.
IN_FLIGHT_COST_S = 600.0


@dataclass(frozen=True)
class Candidate:
    stage_id: str
    job_id: str
    team_id: str
    priority: int
    created_at: dt.datetime  # the job's
    order: int  # the stage's position in its job
    queue: str
    stage_key: str | None


@dataclass
class TeamShare:
    team_id: str
    weight: float
    quota: int  # concurrent stages in flight
    active: int = 0  # stages queued or running now
    recent_gpu_seconds: float = 0.0

    def share(self) -> float:
        return (self.recent_gpu_seconds + self.active * IN_FLIGHT_COST_S) / max(self.weight, 1e-9)


def admit(
    candidates: list[Candidate],
    teams: dict[str, TeamShare],
    free_slots: dict[str, int],
    busy_keys: set[str],
) -> list[Candidate]:
    """The candidates to enqueue now, in admission order. Mutates nothing it was given."""
    teams = {tid: TeamShare(**vars(share)) for tid, share in teams.items()}
    slots = dict(free_slots)
    busy = set(busy_keys)
    remaining = list(candidates)
    admitted: list[Candidate] = []
    while remaining:
        remaining.sort(
            key=lambda c: (teams[c.team_id].share(), c.team_id, -c.priority, c.created_at, c.job_id, c.order)
        )
        chosen = None
        for candidate in remaining:
            team = teams[candidate.team_id]
            if slots.get(candidate.queue, 0) <= 0:
                continue
            if candidate.stage_key is not None and candidate.stage_key in busy:
                continue
            if team.active >= team.quota:
                continue
            chosen = candidate
            break
        if chosen is None:
            break
        remaining.remove(chosen)
        admitted.append(chosen)
        slots[chosen.queue] -= 1
        teams[chosen.team_id].active += 1
        if chosen.stage_key is not None:
            busy.add(chosen.stage_key)
    return admitted


# -- preemption -----------------------------------------------------------------------------------
#
# When every slot of a queue is taken, a waiting stage may take one from a running stage, which writes
# a checkpoint, yields, and resumes later (w2s/resume.py). The rules, as Kueue's fair sharing and
# priority preemption have them:
#
# - Across teams, by share of the queue's slots: a team's fair share of a queue is its weight's part of
#   the slots, among the teams that run or wait there. A team below its fair share may preempt a stage
#   of a team that is *borrowing*: running more than the whole slots of its share (its guaranteed part,
#   never preempted). And only if the swap leaves the preemptor's share, counted per weight, below the
#   victim team's: so the victim's team could never preempt the slot straight back (no ping-pong).
# - Within a team, by priority: a stage of a higher-priority job may preempt the team's own stage of a
#   lower-priority job. Priority never crosses teams.
# - A stage is preempted only after it has run ``min_run_s`` in its current attempt (it made progress
#   worth a checkpoint), and not again within ``window_s`` of its last preemption (no thrashing).
#
# The waiting stage is admitted at once, over the slot count, and runs as soon as the victim's worker
# is free: the slot is given to it, not to whoever the next round would pick.


@dataclass(frozen=True)
class RunningStage:
    stage_id: str
    team_id: str
    priority: int
    queue: str
    started_at: dt.datetime  # its current attempt's start
    last_preempted_at: dt.datetime | None


@dataclass(frozen=True)
class PreemptionRules:
    min_run_s: float
    window_s: float


@dataclass(frozen=True)
class Preemption:
    victim: RunningStage
    for_stage: Candidate
    reason: str  # why, in words, for the victim's log and timeline


def fair_slots(queue_slots: int, weights: dict[str, float]) -> dict[str, float]:
    """Each team's fair share of a queue's slots: its weight's part, among the teams in ``weights``."""
    total = sum(max(w, 1e-9) for w in weights.values())
    return {team: queue_slots * max(w, 1e-9) / total for team, w in weights.items()}


def preemptions(
    waiting: list[Candidate],
    running: list[RunningStage],
    teams: dict[str, TeamShare],
    queue_slots: dict[str, int],
    now: dt.datetime,
    rules: PreemptionRules,
) -> list[Preemption]:
    """Which running stages to preempt, and for which waiting ones (see the rules above). ``waiting``:
    ready stages that found no free slot (in admission order, as :func:`admit` sorts them); ``running``:
    the stages running on the same queues that are not already yielding. Mutates nothing it was given."""
    teams = {tid: TeamShare(**vars(share)) for tid, share in teams.items()}
    alive = list(running)
    on_queue: dict[tuple[str, str], int] = {}
    for stage in running:
        on_queue[stage.queue, stage.team_id] = on_queue.get((stage.queue, stage.team_id), 0) + 1

    def eligible(stage: RunningStage) -> bool:
        ran = (now - stage.started_at).total_seconds() >= rules.min_run_s
        rested = stage.last_preempted_at is None or (
            (now - stage.last_preempted_at).total_seconds() >= rules.window_s
        )
        return ran and rested

    def weight(team_id: str) -> float:
        return max(teams[team_id].weight if team_id in teams else 1.0, 1e-9)

    chosen: list[Preemption] = []
    ordered = sorted(
        waiting,
        key=lambda c: (teams[c.team_id].share(), c.team_id, -c.priority, c.created_at, c.job_id, c.order),
    )
    for candidate in ordered:
        queue, team = candidate.queue, teams[candidate.team_id]
        mine = on_queue.get((queue, candidate.team_id), 0)
        here = [stage for stage in alive if stage.queue == queue and eligible(stage)]
        victim, reason = None, ""
        if team.active < team.quota:
            demanding = {t for (q, t), n in on_queue.items() if q == queue and n > 0} | {candidate.team_id}
            fair = fair_slots(queue_slots.get(queue, 0), {t: weight(t) for t in demanding})
            below = mine < fair[candidate.team_id]
            over = [
                stage
                for stage in here
                if stage.team_id != candidate.team_id
                and on_queue[queue, stage.team_id] > math.floor(fair[stage.team_id] + 1e-9)
                and (mine + 1) / weight(candidate.team_id)
                < on_queue[queue, stage.team_id] / weight(stage.team_id)
            ]
            if below and over:
                victim = max(
                    over,
                    key=lambda s: (on_queue[queue, s.team_id] / weight(s.team_id), -s.priority, s.started_at),
                )
                reason = (
                    f"preempted for another team's stage: that team runs {mine} of {queue}'s "
                    f"{queue_slots.get(queue, 0)} slots, below its fair share of "
                    f"{fair[candidate.team_id]:.1f}; this team runs {on_queue[queue, victim.team_id]}, "
                    f"over its share of {fair[victim.team_id]:.1f}"
                )
        if victim is None:
            own = [s for s in here if s.team_id == candidate.team_id and s.priority < candidate.priority]
            if own:
                victim = max(own, key=lambda s: (-s.priority, s.started_at))
                reason = (
                    f"preempted for a job of its own team with priority {candidate.priority} "
                    f"(this job's is {victim.priority})"
                )
        if victim is None:
            continue
        chosen.append(Preemption(victim, candidate, reason))
        alive.remove(victim)
        on_queue[queue, victim.team_id] -= 1
        on_queue[queue, candidate.team_id] = on_queue.get((queue, candidate.team_id), 0) + 1
        if victim.team_id in teams:
            teams[victim.team_id].active -= 1
        team.active += 1
    return chosen


# The share of a GPU class's memory a stage's estimate may fill: the rest is headroom for what the
# estimate cannot know (other processes' contexts, allocator behaviour on this GPU and driver).
ROUTING_FILL = 1 / 1.1


def gpu_queues(queue_slots: dict[str, int], gpu_classes: dict[str, float]) -> list[tuple[float, str]]:
    """The deployment's GPU classes that have worker slots, as (GiB, name), smallest first."""
    return sorted((size, name) for name, size in gpu_classes.items() if name in queue_slots)


def route_queue(
    memory_gb: float | None, queue_slots: dict[str, int], gpu_classes: dict[str, float]
) -> str | None:
    """The smallest configured GPU class the estimate fits (with 10% headroom); the largest when the
    estimate is unknown; None when it fits none; the CPU queue when the deployment has no GPU queues."""
    queues = gpu_queues(queue_slots, gpu_classes)
    if not queues:
        return "cpu"
    if memory_gb is None:
        return queues[-1][1]
    for size, name in queues:
        if memory_gb <= size * ROUTING_FILL:
            return name
    return None


def next_larger_queue(current: str, queue_slots: dict[str, int], gpu_classes: dict[str, float]) -> str | None:
    """The next GPU class up from ``current``, for a stage that ran out of memory there; None at the top."""
    queues = gpu_queues(queue_slots, gpu_classes)
    size = gpu_classes.get(current)
    larger = [name for queue_size, name in queues if size is not None and queue_size > size]
    return larger[0] if larger else None


def classes_tried(
    memory_gb: float | None, current: str, queue_slots: dict[str, int], gpu_classes: dict[str, float]
) -> list[str]:
    """The GPU classes a stage has run on by the time it runs out of memory on ``current``: from the
    one its estimate chose up to ``current`` (each out-of-memory moves it one class up)."""
    queues = gpu_queues(queue_slots, gpu_classes)
    first = route_queue(memory_gb, queue_slots, gpu_classes) or current
    low, high = gpu_classes.get(first, 0.0), gpu_classes.get(current, 0.0)
    return [name for size, name in queues if low <= size <= high] or [current]
