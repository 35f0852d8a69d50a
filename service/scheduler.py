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
