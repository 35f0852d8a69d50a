"""The admission rules: fair share per weight across teams, priority then age within a team;
quotas; duplicate keys; routing by memory estimate; and the state machines."""

from __future__ import annotations

import datetime as dt

import pytest

from service.scheduler import (
    IN_FLIGHT_COST_S,
    Candidate,
    PreemptionRules,
    RunningStage,
    TeamShare,
    admit,
    classes_tried,
    next_larger_queue,
    preemptions,
    route_queue,
)
from service.states import InvalidTransition, check_job_transition, check_stage_transition

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def candidate(
    name: str,
    team: str,
    *,
    priority: int = 0,
    minutes: int = 0,
    queue: str = "gpu-80g",
    key: str | None = None,
    order: int = 0,
) -> Candidate:
    return Candidate(
        name, f"job-{name}", team, priority, T0 + dt.timedelta(minutes=minutes), order, queue, key
    )


def teams(**recent: float) -> dict[str, TeamShare]:
    return {
        name: TeamShare(name, weight=1.0, quota=10, recent_gpu_seconds=seconds)
        for name, seconds in recent.items()
    }


def admitted(
    candidates: list[Candidate], shares: dict[str, TeamShare], slots: int, busy: set[str] | None = None
):  # type: ignore[no-untyped-def]
    return [c.stage_id for c in admit(candidates, shares, {"gpu-80g": slots}, busy or set())]


def test_priority_orders_a_teams_own_work_but_never_beats_fair_share() -> None:
    own = [candidate("old-low", "a", minutes=0), candidate("new-high", "a", priority=5, minutes=9)]
    assert admitted(own, teams(a=0.0), slots=1) == ["new-high"]
    # Another team with priority 100 and a million GPU-seconds used waits for the team with none.
    rival = [candidate("hog", "b", priority=100), candidate("modest", "a", priority=-100, minutes=9)]
    assert admitted(rival, teams(a=0.0, b=1e6), slots=1) == ["modest"]


def test_a_priority_100_team_cannot_starve_another_team() -> None:
    hog = [candidate(f"hog{i}", "hog", priority=100, minutes=i) for i in range(50)]
    quiet = [candidate(f"quiet{i}", "quiet", minutes=100 + i) for i in range(5)]
    chosen = admitted(hog + quiet, teams(hog=0.0, quiet=0.0), slots=8)
    # Equal usage: one round alternates between the teams (in-flight stages count against a team).
    assert sum(name.startswith("quiet") for name in chosen) == 4


def test_fair_share_prefers_the_team_with_least_recent_gpu_time_per_weight() -> None:
    candidates = [candidate("heavy", "a", minutes=0), candidate("light", "b", minutes=5)]
    assert admitted(candidates, teams(a=5000.0, b=100.0), slots=1) == ["light"]
    # Weight scales the share: a team with 100x the weight counts 100x less of its usage.
    shares = teams(a=5000.0, b=100.0)
    shares["a"].weight = 100.0
    assert admitted(candidates, shares, slots=1) == ["heavy"]


def test_age_breaks_ties_and_one_round_interleaves_teams() -> None:
    candidates = [
        candidate("a1", "a", minutes=0),
        candidate("a2", "a", minutes=1),
        candidate("b1", "b", minutes=2),
    ]
    # Equal usage: the oldest first; then team a's in-flight stage counts against it, so b goes next.
    assert admitted(candidates, teams(a=0.0, b=0.0), slots=2) == ["a1", "b1"]
    assert IN_FLIGHT_COST_S > 0


def test_quota_is_never_exceeded() -> None:
    shares = teams(a=0.0, b=0.0)
    shares["a"].quota = 2
    shares["a"].active = 1
    candidates = [candidate(f"a{i}", "a", minutes=i) for i in range(4)] + [candidate("b0", "b", minutes=9)]
    result = admit(candidates, shares, {"gpu-80g": 5}, set())
    # Team a already has a stage in flight, so b's goes first; a gets one more and reaches its quota.
    assert [c.stage_id for c in result] == ["b0", "a0"]


def test_free_slots_per_queue() -> None:
    candidates = [candidate("g", "a", queue="gpu-80g"), candidate("c", "a", queue="cpu", minutes=1)]
    result = admit(candidates, teams(a=0.0), {"gpu-80g": 0, "cpu": 1}, set())
    assert [c.stage_id for c in result] == ["c"]


def test_identical_stage_keys_run_once() -> None:
    candidates = [
        candidate("x1", "a", key="k"),
        candidate("x2", "b", key="k", minutes=1),
        candidate("y", "b", key="j"),
    ]
    result = admit(candidates, teams(a=0.0, b=0.0), {"gpu-80g": 3}, set())
    assert [c.stage_id for c in result] == ["x1", "y"]  # x2 waits for x1's result
    # Already running elsewhere: wait for it.
    assert admitted([candidate("z", "a", key="busy")], teams(a=0.0), slots=1, busy={"busy"}) == []


def test_admit_does_not_mutate_its_inputs() -> None:
    shares = teams(a=0.0)
    admit([candidate("a", "a")], shares, {"gpu-80g": 1}, set())
    assert shares["a"].active == 0


def test_routing_by_memory_estimate() -> None:
    classes = {"gpu-24g": 24.0, "gpu-80g": 80.0}
    slots = {"gpu-24g": 2, "gpu-80g": 1, "cpu": 1}
    assert route_queue(10.0, slots, classes) == "gpu-24g"
    assert route_queue(30.0, slots, classes) == "gpu-80g"
    assert route_queue(22.5, slots, classes) == "gpu-80g"  # 10% headroom
    assert route_queue(500.0, slots, classes) is None  # fits nothing: planning refuses it
    assert route_queue(None, slots, classes) == "gpu-80g"  # unknown: the largest
    assert route_queue(10.0, {"cpu": 1}, classes) == "cpu"  # a CPU-only deployment


def test_out_of_memory_moves_one_class_up_and_knows_the_classes_tried() -> None:
    classes = {"gpu-24g": 24.0, "gpu-48g": 48.0, "gpu-80g": 80.0}
    slots = {"gpu-24g": 1, "gpu-48g": 1, "gpu-80g": 1, "cpu": 1}
    assert next_larger_queue("gpu-24g", slots, classes) == "gpu-48g"
    assert next_larger_queue("gpu-80g", slots, classes) is None
    assert next_larger_queue("gpu-24g", {"gpu-24g": 1, "gpu-80g": 1}, classes) == "gpu-80g"  # no 48g slots
    assert next_larger_queue("cpu", slots, classes) is None
    assert classes_tried(10.0, "gpu-80g", slots, classes) == ["gpu-24g", "gpu-48g", "gpu-80g"]
    assert classes_tried(30.0, "gpu-80g", slots, classes) == ["gpu-48g", "gpu-80g"]
    assert classes_tried(None, "gpu-80g", slots, classes) == ["gpu-80g"]


def test_state_machines() -> None:
    assert check_job_transition("queued", "running") == "running"
    assert check_stage_transition("running", "running") == "running"  # redelivery
    with pytest.raises(InvalidTransition, match="final"):
        check_job_transition("succeeded", "running")
    with pytest.raises(InvalidTransition, match="it may go to: cached, cancelled, failed, queued"):
        check_stage_transition("pending", "succeeded")


# -- preemption ------------------------------------------------------------------------------------

NOW = T0 + dt.timedelta(hours=1)
RULES = PreemptionRules(min_run_s=120, window_s=900)


def running(
    name: str, team: str, *, priority: int = 0, ran_s: float = 600, preempted_s_ago: float | None = None
) -> RunningStage:
    return RunningStage(
        name,
        team,
        priority,
        "gpu-80g",
        NOW - dt.timedelta(seconds=ran_s),
        None if preempted_s_ago is None else NOW - dt.timedelta(seconds=preempted_s_ago),
    )


def active_teams(active: dict[str, int], weights: dict[str, float] | None = None) -> dict[str, TeamShare]:
    return {
        team: TeamShare(team, weight=(weights or {}).get(team, 1.0), quota=10, active=count)
        for team, count in active.items()
    }


def victims(waiting, stages, shares, slots: int, rules: PreemptionRules = RULES):  # type: ignore[no-untyped-def]
    return [
        (p.victim.stage_id, p.for_stage.stage_id)
        for p in preemptions(waiting, stages, shares, {"gpu-80g": slots}, NOW, rules)
    ]


def test_a_team_below_its_share_preempts_a_borrowing_team() -> None:
    # b holds both slots; a (same weight) runs nothing: a's fair share is one slot, b borrows one.
    stages = [running("b1", "b", ran_s=900), running("b2", "b", ran_s=300)]
    chosen = victims([candidate("a1", "a")], stages, active_teams({"a": 0, "b": 2}), slots=2)
    assert chosen == [("b2", "a1")]  # the most recently started of the borrower's stages
    # Once each runs one, nobody is preempted: b's one slot is its guaranteed share.
    assert (
        victims(
            [candidate("b3", "b")],
            [running("a1", "a"), running("b1", "b")],
            active_teams({"a": 1, "b": 1}),
            2,
        )
        == []
    )


def test_guaranteed_share_is_never_preempted_and_no_swap_that_would_ping_pong() -> None:
    # One slot, equal weights: neither team's share is a whole slot; taking it would only invert the
    # situation, and the other team would take it straight back. Nobody is preempted.
    assert victims([candidate("a1", "a")], [running("b1", "b")], active_teams({"a": 0, "b": 1}), 1) == []
    # Weight 3 against 1: a's share is 0.75 of the slot, b's 0.25, so b's stage borrows it.
    shares = active_teams({"a": 0, "b": 1}, weights={"a": 3.0, "b": 1.0})
    assert victims([candidate("a1", "a")], [running("b1", "b")], shares, 1) == [("b1", "a1")]
    # ... and never the other way round.
    shares = active_teams({"a": 1, "b": 0}, weights={"a": 3.0, "b": 1.0})
    assert victims([candidate("b1", "b")], [running("a1", "a")], shares, 1) == []
    # Four slots, equal weights, b runs 3: b's guaranteed share is 2, so one of its stages can go.
    stages = [running(f"b{i}", "b") for i in range(3)] + [running("a1", "a")]
    chosen = victims([candidate("a2", "a"), candidate("a3", "a")], stages, active_teams({"a": 1, "b": 3}), 4)
    assert len(chosen) == 1 and chosen[0][1] == "a2"


def test_priority_preempts_within_a_team_only() -> None:
    stages = [running("a-low", "a", priority=0), running("b-low", "b", priority=0)]
    shares = active_teams({"a": 1, "b": 1})
    assert victims([candidate("a-high", "a", priority=5)], stages, shares, 2) == [("a-low", "a-high")]
    # Equal priority preempts nothing; and a priority never reaches across teams.
    assert victims([candidate("a-same", "a", priority=0)], stages, shares, 2) == []
    only_b = [running("b-low", "b", priority=0)]
    assert victims([candidate("a-high", "a", priority=99)], only_b, active_teams({"a": 0, "b": 1}), 1) == []


def test_a_stage_is_preempted_only_after_its_minimum_run_and_not_twice_within_the_window() -> None:
    shares = active_teams({"a": 0, "b": 2})
    waiting = [candidate("a1", "a")]
    young = [running("b1", "b", ran_s=60), running("b2", "b", ran_s=60)]
    assert victims(waiting, young, shares, 2) == []  # under min_run_s: it keeps its slot for now
    rested = [running("b1", "b", preempted_s_ago=600), running("b2", "b", preempted_s_ago=1200)]
    assert victims(waiting, rested, shares, 2) == [("b2", "a1")]  # b1 was preempted 10 min ago
    tired = [running("b1", "b", preempted_s_ago=600), running("b2", "b", preempted_s_ago=60)]
    assert victims(waiting, tired, shares, 2) == []


def test_one_victim_per_waiting_stage_and_inputs_unchanged() -> None:
    shares = active_teams({"a": 0, "b": 4})
    stages = [running(f"b{i}", "b", ran_s=600 + i) for i in range(4)]
    waiting = [candidate(f"a{i}", "a", order=i) for i in range(3)]
    chosen = victims(waiting, stages, shares, 4)
    # a's share is 2 of 4: two stages are preempted for a's first two, the third waits.
    assert [for_stage for _, for_stage in chosen] == ["a0", "a1"]
    assert len({victim for victim, _ in chosen}) == 2
    assert shares["b"].active == 4 and shares["a"].active == 0
