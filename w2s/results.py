"""Aggregate stage results over seeds into the results JSON the CLI prints and the API serves.

Shape::

    {"weak": {"accuracy", "auroc"}, "ceiling": {...},
     "students": {"<loss>": {"accuracy", "auroc", "pgr", "agreement_with_weak"}},
     "flags": [...], "seeds": N, "per_seed": [...], "timings": {...}}

Every figure ``f`` is the mean over seeds, with ``f_std`` (across seeds) and ``f_ci`` (a 95%
percentile bootstrap over test examples of the seed mean) beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from w2s import metrics

FLAG_DESCRIPTIONS = {
    "ceiling_not_above_weak": "the strong ceiling is not more accurate than the weak model: PGR is undefined",
    "ceiling_at_chance": "the strong ceiling is no better than predicting the majority class",
    "weak_at_chance": "the weak model is no better than predicting the majority class",
}
# Accuracy within this margin of the majority-class rate counts as chance.
CHANCE_MARGIN = 0.01
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class SeedPredictions:
    """Test-set probabilities of every model trained with one seed."""

    seed: int
    weak: np.ndarray
    ceiling: np.ndarray
    students: dict[str, np.ndarray]


Statistic = Callable[[np.ndarray, np.ndarray], float | None]  # (indices, probs) -> value


def _accuracy_on(labels: np.ndarray) -> Statistic:
    return lambda idx, probs: metrics.accuracy(probs[idx], labels[idx])


def _auroc_on(labels: np.ndarray) -> Statistic:
    return lambda idx, probs: metrics.auroc(probs[idx], labels[idx])


def _figure(
    name: str,
    per_seed: Sequence[float | None],
    seed_mean_on: Callable[[np.ndarray], float | None],
    n_test: int,
) -> dict[str, object]:
    summary = metrics.summarize(per_seed)
    interval = metrics.bootstrap_interval(seed_mean_on, n_test, n_resamples=BOOTSTRAP_RESAMPLES)
    return {
        name: summary["mean"],
        f"{name}_std": summary["std"],
        f"{name}_ci": list(interval) if interval is not None else None,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def build_results(
    predictions: Sequence[SeedPredictions],
    test_labels: np.ndarray,
    timings: dict[str, float],
) -> dict[str, object]:
    """The results document for one experiment (one or more seeds)."""
    labels = np.asarray(test_labels)
    n = len(labels)
    accuracy, auroc = _accuracy_on(labels), _auroc_on(labels)

    def model_figures(probs_of: Callable[[SeedPredictions], np.ndarray]) -> dict[str, object]:
        figures: dict[str, object] = {}
        for name, stat in (("accuracy", accuracy), ("auroc", auroc)):
            whole = np.arange(n)
            per_seed = [stat(whole, probs_of(p)) for p in predictions]
            figures |= _figure(
                name, per_seed, lambda idx, s=stat: _mean([s(idx, probs_of(p)) for p in predictions]), n
            )
        return figures

    results: dict[str, object] = {
        "weak": model_figures(lambda p: p.weak),
        "ceiling": model_figures(lambda p: p.ceiling),
    }
    whole = np.arange(n)
    students: dict[str, object] = {}
    for loss in predictions[0].students:
        figures = model_figures(lambda p, loss=loss: p.students[loss])

        def pgr_on(idx: np.ndarray, loss: str = loss) -> float | None:
            # PGR of the seed means, so one noisy seed cannot blow up the ratio.
            return metrics.pgr(
                _mean([accuracy(idx, p.weak) for p in predictions]) or 0.0,
                _mean([accuracy(idx, p.ceiling) for p in predictions]) or 0.0,
                _mean([accuracy(idx, p.students[loss]) for p in predictions]) or 0.0,
            )

        pgr_per_seed = [
            metrics.pgr(
                accuracy(whole, p.weak), accuracy(whole, p.ceiling), accuracy(whole, p.students[loss])
            )
            for p in predictions
        ]
        interval = metrics.bootstrap_interval(pgr_on, n, n_resamples=BOOTSTRAP_RESAMPLES)
        figures["pgr"] = pgr_on(whole)
        figures["pgr_std"] = metrics.summarize(pgr_per_seed)["std"]
        figures["pgr_ci"] = list(interval) if interval is not None else None
        figures |= _figure(
            "agreement_with_weak",
            [metrics.agreement(p.students[loss], p.weak) for p in predictions],
            lambda idx, loss=loss: _mean(
                [metrics.agreement(p.students[loss][idx], p.weak[idx]) for p in predictions]
            ),
            n,
        )
        students[loss] = figures
    results["students"] = students
    results["flags"] = _flags(results, labels)
    results["seeds"] = len(predictions)
    results["per_seed"] = [
        {
            "seed": p.seed,
            "weak": metrics.accuracy(p.weak, labels),
            "ceiling": metrics.accuracy(p.ceiling, labels),
            "students": {loss: metrics.accuracy(probs, labels) for loss, probs in p.students.items()},
        }
        for p in predictions
    ]
    results["timings"] = timings
    return results


def _flags(results: dict[str, object], labels: np.ndarray) -> list[str]:
    majority = max(float(np.mean(labels)), 1.0 - float(np.mean(labels)))
    weak = results["weak"]["accuracy"]  # type: ignore[index]
    ceiling = results["ceiling"]["accuracy"]  # type: ignore[index]
    flags = []
    if ceiling <= weak:
        flags.append("ceiling_not_above_weak")
    if ceiling <= majority + CHANCE_MARGIN:
        flags.append("ceiling_at_chance")
    if weak <= majority + CHANCE_MARGIN:
        flags.append("weak_at_chance")
    return flags
