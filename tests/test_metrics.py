"""Tests for w2s.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from w2s.metrics import accuracy, agreement, auroc, bootstrap_interval, pgr, summarize


def a(*xs: float) -> np.ndarray:
    return np.asarray(xs, dtype=np.float64)


def test_accuracy() -> None:
    # predictions: 1, 0, 1, 0 (0.5 is not > 0.5); labels 1, 0, 0, 1 -> 2 of 4.
    assert accuracy(a(0.9, 0.1, 0.7, 0.5), np.array([1, 0, 0, 1])) == 0.5
    assert accuracy(a(0.9, 0.2), np.array([1, 0])) == 1.0
    # soft labels are hardened at 0.5 as well.
    assert accuracy(a(0.9, 0.2), a(0.8, 0.6)) == 0.5


def test_auroc_hand_values() -> None:
    # Perfect separation, and its reverse.
    assert auroc(a(0.1, 0.2, 0.8, 0.9), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(a(0.9, 0.8, 0.2, 0.1), np.array([0, 0, 1, 1])) == 0.0
    # pos scores {0.35, 0.8}, neg {0.1, 0.4}: pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4.
    assert auroc(a(0.1, 0.4, 0.35, 0.8), np.array([0, 0, 1, 1])) == 0.75


def test_auroc_ties_count_half() -> None:
    # pos {0.5, 0.9}, neg {0.5, 0.1}: pairs: (0.5 vs 0.5) = 1/2, (0.5 vs 0.1) = 1, (0.9, *) = 2 -> 3.5 / 4.
    assert auroc(a(0.5, 0.1, 0.5, 0.9), np.array([0, 0, 1, 1])) == pytest.approx(0.875)
    # All scores tied -> 0.5.
    assert auroc(a(0.3, 0.3, 0.3), np.array([0, 1, 1])) == pytest.approx(0.5)
    # Three-way tie across classes: pos {0.2, 0.2}, neg {0.2, 0.0}: 1/2 + 1 + 1/2 + 1 = 3 -> 3/4.
    assert auroc(a(0.2, 0.0, 0.2, 0.2), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auroc_single_class_is_none() -> None:
    assert auroc(a(0.1, 0.9), np.array([1, 1])) is None
    assert auroc(a(0.1, 0.9), np.array([0, 0])) is None


def test_pgr() -> None:
    assert pgr(0.6, 0.8, 0.7) == pytest.approx(0.5)
    assert pgr(0.6, 0.8, 0.9) == pytest.approx(1.5)
    assert pgr(0.6, 0.8, 0.5) == pytest.approx(-0.5)
    assert pgr(0.8, 0.8, 0.9) is None
    assert pgr(0.8, 0.7, 0.9) is None


def test_agreement() -> None:
    # hard a: 1, 0, 1, 0; hard b: 1, 1, 1, 0 -> 3 of 4.
    assert agreement(a(0.9, 0.4, 0.6, 0.5), a(0.7, 0.8, 0.51, 0.2)) == 0.75


@pytest.mark.parametrize("fn", [accuracy, agreement, auroc])
def test_shape_validation(fn: object) -> None:
    with pytest.raises(ValueError, match="length"):
        fn(a(0.1, 0.2), np.array([1]))  # type: ignore[operator]
    with pytest.raises(ValueError, match="empty"):
        fn(a(), np.array([]))  # type: ignore[operator]
    with pytest.raises(ValueError, match="1-D"):
        fn(np.zeros((2, 2)), np.zeros((2, 2)))  # type: ignore[operator]


def test_bootstrap_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(123)
    data = rng.normal(1.0, 1.0, size=200)
    point = float(data.mean())

    def stat(idx: np.ndarray) -> float:
        assert idx.shape == (200,) and idx.min() >= 0 and idx.max() < 200
        return float(data[idx].mean())

    interval = bootstrap_interval(stat, 200, n_resamples=300, seed=7)
    assert interval is not None
    lo, hi = interval
    assert lo < point < hi
    # Standard error ~ 1/sqrt(200) ~ 0.07: a 95% interval is roughly +-0.14 wide around the mean.
    assert 0.1 < hi - lo < 0.5
    assert bootstrap_interval(stat, 200, n_resamples=300, seed=7) == interval
    assert bootstrap_interval(stat, 200, n_resamples=300, seed=8) != interval
    narrower = bootstrap_interval(stat, 200, n_resamples=300, confidence=0.5, seed=7)
    assert narrower is not None and lo < narrower[0] < narrower[1] < hi


def test_bootstrap_skips_none_and_all_none() -> None:
    labels = np.array([0, 1])
    scores = a(0.2, 0.8)
    # On 2 examples, resamples with a single class give None and are skipped; the rest give AUROC 1.
    assert bootstrap_interval(lambda idx: auroc(scores[idx], labels[idx]), 2, n_resamples=50) == (1.0, 1.0)
    assert bootstrap_interval(lambda idx: None, 5, n_resamples=20) is None


def test_bootstrap_validation() -> None:
    with pytest.raises(ValueError, match="n must"):
        bootstrap_interval(lambda idx: 0.0, 0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_interval(lambda idx: 0.0, 3, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(lambda idx: 0.0, 3, confidence=1.0)


def test_summarize() -> None:
    # values 1, 2, 3 (None ignored): mean 2, sample std sqrt(((1)^2 + 0 + 1^2) / 2) = 1.
    assert summarize([1.0, None, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    out = summarize([0.5, 0.7])
    assert out["mean"] == pytest.approx(0.6)
    assert out["std"] == pytest.approx(math.sqrt(((0.1) ** 2 * 2) / 1))
    assert summarize([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert summarize([None, None]) == {"mean": None, "std": None, "n": 0}
    assert summarize([]) == {"mean": None, "std": None, "n": 0}
