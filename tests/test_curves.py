"""Bounded training curves (w2s/curves.py): a long series keeps its shape, its ends and a bounded
number of points; a short one is kept whole."""

from __future__ import annotations

import math
import random

import pytest

from w2s.curves import CurveSampler, lttb


def sample(values: list[float], max_points: int) -> tuple[list[tuple[int, float]], CurveSampler]:
    sampler = CurveSampler(len(values), max_points)
    kept = []
    for step, value in enumerate(values, start=1):
        kept += sampler.add(step, value)
    kept += sampler.finish()
    return kept, sampler


def test_a_short_curve_is_kept_whole_and_at_once() -> None:
    sampler = CurveSampler(total_steps=50, max_points=100)
    for step in range(1, 51):
        assert sampler.add(step, step / 10) == [(step, step / 10)]  # no lag: live curves stay live
    assert sampler.finish() == []


@pytest.mark.parametrize(("steps", "max_points"), [(1_000, 100), (123_457, 2_000), (10, 4), (99, 5)])
def test_a_long_curve_keeps_at_most_max_points_with_its_ends_in_order(steps: int, max_points: int) -> None:
    rng = random.Random(steps)
    values = [math.sin(i / 50) + rng.gauss(0, 0.1) for i in range(steps)]
    kept, sampler = sample(values, max_points)
    kept_steps = [step for step, _ in kept]
    assert len(kept) <= max_points
    assert kept_steps == sorted(set(kept_steps))  # each step once, in order: appended rows never move
    assert kept[0] == (1, values[0]) and kept[-1] == (steps, values[-1])
    assert all(values[step - 1] == value for step, value in kept)  # real points, not averages
    summary = sampler.summary
    assert (summary.points_seen, summary.min_value, summary.max_value) == (steps, min(values), max(values))
    assert (summary.last_step, summary.last_value) == (steps, values[-1])


def test_a_spike_survives_downsampling() -> None:
    """A stride would drop a one-step loss spike; LTTB keeps it (the point of a shape-preserving method)."""
    values = [1.0] * 100_000
    values[31_337] = 9.0
    kept, _ = sample(values, 500)
    assert (31_338, 9.0) in kept
    steps = list(range(len(values)))
    assert 31_337 in lttb(steps, values, 500)


def test_lttb_keeps_everything_when_short_and_bounds_otherwise() -> None:
    assert lttb([1, 2, 3], [0.0, 1.0, 0.0], 10) == [0, 1, 2]
    indices = lttb(list(range(10_000)), [math.cos(i / 7) for i in range(10_000)], 300)
    assert len(indices) == 300 and indices[0] == 0 and indices[-1] == 9_999
    assert indices == sorted(set(indices))


def test_too_few_points_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        CurveSampler(100, 3)
