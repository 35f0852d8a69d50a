"""Training curves of bounded size: a series of a million steps is kept as a few thousand points
that keep its shape, plus the exact minimum, maximum and last value.

Shape is kept with Largest-Triangle-Three-Buckets (Steinarsson 2013, "Downsampling Time Series for
Visual Representation", the method TensorBoard-style tools use): the steps are cut into buckets and
each bucket keeps the one point that forms the largest triangle with the point kept before it and
the average of the next bucket, so peaks and dips survive where a plain stride would drop them.

:class:`CurveSampler` does this while training runs, one point at a time, holding at most two
buckets in memory; :func:`lttb` does it to a whole series (the service thins a stored curve further
when a reader asks for fewer points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[int, float]  # (step, value)


def _triangle_area(a: Point, b: Point, c: tuple[float, float]) -> float:
    return abs((a[0] - c[0]) * (b[1] - a[1]) - (a[0] - b[0]) * (c[1] - a[1]))


def _largest_triangle(anchor: Point, bucket: Sequence[Point], following: tuple[float, float]) -> Point:
    best = bucket[0]
    best_area = -1.0
    for point in bucket:
        area = _triangle_area(anchor, point, following)
        if area > best_area:
            best, best_area = point, area
    return best


def _average(bucket: Sequence[Point]) -> tuple[float, float]:
    return (
        sum(step for step, _ in bucket) / len(bucket),
        sum(value for _, value in bucket) / len(bucket),
    )


def lttb(steps: Sequence[int], values: Sequence[float], max_points: int) -> list[int]:
    """Indices of at most ``max_points`` points of the series that keep its shape (LTTB); every
    index when the series is that short already. The first and last point are always kept."""
    n = len(steps)
    if max_points >= n or n <= 2:
        return list(range(n))
    max_points = max(max_points, 3)
    kept = [0]
    width = (n - 2) / (max_points - 2)  # the points between the first and last, in equal buckets
    anchor = 0
    for bucket in range(max_points - 2):
        start = int(bucket * width) + 1
        end = int((bucket + 1) * width) + 1
        next_end = min(int((bucket + 2) * width) + 1, n)
        following = range(end, next_end) if end < next_end else range(n - 1, n)
        average = (
            sum(steps[i] for i in following) / len(following),
            sum(values[i] for i in following) / len(following),
        )
        a = (steps[anchor], values[anchor])
        best, best_area = start, -1.0
        for i in range(start, end):
            area = _triangle_area(a, (steps[i], values[i]), average)
            if area > best_area:
                best, best_area = i, area
        kept.append(best)
        anchor = best
    kept.append(n - 1)
    return kept


@dataclass
class CurveSummary:
    """Exact figures of a whole series, whatever was kept of its points."""

    points_seen: int = 0
    min_value: float = math.inf
    max_value: float = -math.inf
    last_step: int = 0
    last_value: float = math.nan

    def add(self, step: int, value: float) -> None:
        self.points_seen += 1
        self.min_value = min(self.min_value, value)
        self.max_value = max(self.max_value, value)
        self.last_step, self.last_value = step, value


class CurveSampler:
    """Keeps at most ``max_points`` points of one series of ``total_steps`` steps, as they arrive.

    The steps are cut into buckets of ``ceil(total_steps / (max_points - 3))``; the first and the
    last point are kept, and each bucket keeps the point LTTB picks once the next bucket is complete
    (its average is the third corner of the triangle). A stage of at most ``max_points - 3`` steps
    keeps every point, at once."""

    def __init__(self, total_steps: int, max_points: int):
        if max_points < 4:
            raise ValueError(f"max_points must be at least 4, not {max_points}")
        self.width = max(1, math.ceil(max(total_steps, 1) / (max_points - 3)))
        self.summary = CurveSummary()
        self._anchor: Point | None = None  # the point kept last
        self._pending: list[Point] = []  # a complete bucket, waiting for the next one's average
        self._current: list[Point] = []  # the bucket being filled
        self._current_bucket = -1

    def add(self, step: int, value: float) -> list[Point]:
        """Take the next point; return the points to keep that are decided now."""
        self.summary.add(step, value)
        point = (step, value)
        if self._anchor is None or self.width == 1:
            self._anchor = point
            return [point]
        bucket = step // self.width
        if bucket == self._current_bucket or not self._current:
            self._current.append(point)
            self._current_bucket = bucket
            return []
        kept = []
        if self._pending:
            self._anchor = _largest_triangle(self._anchor, self._pending, _average(self._current))
            kept.append(self._anchor)
        self._pending, self._current, self._current_bucket = self._current, [point], bucket
        return kept

    def finish(self) -> list[Point]:
        """The series ended (last step, or the attempt stopped): the points still undecided."""
        kept = []
        if self._anchor is not None and self._pending:
            following = _average(self._current) if self._current else self._pending[-1]
            self._anchor = _largest_triangle(self._anchor, self._pending, following)
            kept.append(self._anchor)
        if self._anchor is not None and self._current:
            if len(self._current) > 1:
                self._anchor = _largest_triangle(self._anchor, self._current[:-1], self._current[-1])
                kept.append(self._anchor)
            kept.append(self._current[-1])  # the last point, always
            self._anchor = self._current[-1]
        self._pending, self._current, self._current_bucket = [], [], -1
        return kept
