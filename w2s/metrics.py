"""Evaluation metrics on numpy arrays (no torch): accuracy, AUROC, PGR, agreement, bootstrap, summaries.

Binary conventions: ``probs_pos`` is P(class 1) per example and its hard prediction is ``probs_pos > 0.5``;
``labels`` are 0/1 (soft labels are hardened with ``> 0.5`` too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "agreement",
    "auroc",
    "bootstrap_counts",
    "bootstrap_interval",
    "pgr",
    "summarize",
    "weighted_auroc",
]


def _vectors(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two non-empty 1-D arrays of equal length."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"{name_a} and {name_b} must be 1-D, got shapes {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} differ in length: {a.shape[0]} != {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError(f"{name_a} and {name_b} are empty")
    return a, b


def _hard(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) > 0.5


def accuracy(probs_pos: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples where ``probs_pos > 0.5`` matches the (hard) label."""
    probs_pos, labels = _vectors("probs_pos", probs_pos, "labels", labels)
    return float(np.mean(_hard(probs_pos) == _hard(labels)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the average of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]  # exclusive
    run_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks_sorted = np.repeat(run_rank, ends - starts)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count 1/2).

    Returns None when only one class is present (the AUROC is undefined).
    """
    scores, labels = _vectors("scores", scores, "labels", labels)
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    positive = _hard(labels)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pgr(weak: float, ceiling: float, student: float) -> float | None:
    """Performance gap recovered: (student - weak) / (ceiling - weak); None if ceiling <= weak."""
    if ceiling <= weak:
        return None
    return float((student - weak) / (ceiling - weak))


def agreement(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Fraction of examples on which the two models' hard predictions (``> 0.5``) agree."""
    probs_a, probs_b = _vectors("probs_a", probs_a, "probs_b", probs_b)
    return float(np.mean(_hard(probs_a) == _hard(probs_b)))


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float | None],
    n: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval.

    ``statistic`` receives an index array (``n`` draws from ``range(n)`` with replacement) and returns a
    value or None (e.g. an AUROC on a one-class resample); Nones (and NaNs) are skipped. Returns None when
    every resample was skipped. Deterministic in ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) or n_resamples <= 0:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        value = statistic(idx)
        if value is not None and not math.isnan(value):
            values.append(float(value))
    if not values:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(np.asarray(values), [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_counts(n: int, n_resamples: int, *, seed: int = 0, chunk: int = 100) -> Iterator[np.ndarray]:
    """The bootstrap as multiplicities: chunks of a ``(resamples, n)`` matrix whose row r counts how
    often resample r drew each of the n examples. Drawn once and shared by every statistic (a joint
    bootstrap); deterministic in ``seed`` and the same whatever the chunk size."""
    if n <= 0 or n_resamples <= 0:
        raise ValueError(f"n and n_resamples must be positive, got {n} and {n_resamples}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        drawn = rng.integers(0, n, size=(rows, n))
        flat = (drawn + np.arange(rows)[:, None] * n).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n)


def weighted_auroc(counts: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every resample at once: ``counts`` (resamples, n) are multiplicities of the examples.

    The Mann-Whitney statistic with ties counting 1/2, as :func:`auroc`, computed over the examples
    sorted once by score. NaN where a resample holds one class only.
    """
    scores, labels = _vectors("scores", scores, "labels", labels)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # runs of tied scores
    positive = _hard(labels)[order]
    weights = counts[:, order].astype(np.float64)
    pos = np.add.reduceat(weights * positive, starts, axis=1)  # (resamples, distinct scores)
    neg = np.add.reduceat(weights * ~positive, starts, axis=1)
    negatives_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    u = (pos * (negatives_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos * n_neg > 0, u / (n_pos * n_neg), np.nan)


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float] | None:
    """The central ``confidence`` percentile interval of the finite values; None if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof=1; 0.0 for a single value) and count, ignoring Nones.

    With no values: ``{"mean": None, "std": None, "n": 0}``.
    """
    present = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    n = int(present.size)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(present, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(present)), "std": std, "n": n}
