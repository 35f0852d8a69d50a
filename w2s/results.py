"""Aggregate stage results over seeds into the results JSON the CLI prints and the API serves.

Shape::

    {"weak": {"accuracy", "auroc"}, "ceiling": {...},
     "gap": {"ceiling_minus_weak", "ceiling_minus_weak_ci"},
     "students": {"<loss>": {"accuracy", "auroc", "pgr", "pgr_undefined_share", "pgr_per_seed",
                             "agreement_with_weak"}},
     "flags": [...], "seeds": N, "per_seed": [...], "timings": {...}}

Every figure ``f`` is the mean over seeds, with ``f_std`` (across seeds) and ``f_ci`` (a 95%
percentile bootstrap over test examples of the seed mean) beside it. The bootstrap is joint: one set
of resamples of the test rows serves every model, seed and figure, so paired differences (the gap,
PGR) keep their pairing.

PGR = (student - weak) / (ceiling - weak) is undefined where the ceiling does not beat the weak
model. Resamples where that happens are counted (``pgr_undefined_share``), never dropped silently:
the interval is withheld (null, with a flag) when the point PGR is undefined or more than
``PGR_UNDEFINED_LIMIT`` of the resamples are, because percentiles of the rest would describe a biased
subset. Seeds whose own PGR is undefined appear as null in ``pgr_per_seed`` and are flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from w2s import metrics

FLAG_DESCRIPTIONS = {
    "ceiling_not_above_weak": "the strong ceiling is not more accurate than the weak model: PGR is undefined",
    "ceiling_at_chance": "the strong ceiling is no better than predicting the majority class",
    "weak_at_chance": "the weak model is no better than predicting the majority class",
    "ceiling_weak_gap_not_significant": (
        "the 95% interval of ceiling minus weak accuracy contains 0: the gap PGR divides by is not "
        "distinguishable from zero, so PGR is not measurable here"
    ),
    "pgr_interval_withheld": (
        "a PGR interval is not given: PGR is undefined on the test set or on more than 5% of "
        "bootstrap resamples (see pgr_undefined_share)"
    ),
    "pgr_undefined_for_some_seeds": (
        "for some seeds the ceiling does not beat the weak model, so their PGR is undefined "
        "(null in pgr_per_seed); pgr_std covers the other seeds"
    ),
}
# Accuracy within this margin of the majority-class rate counts as chance.
CHANCE_MARGIN = 0.01
BOOTSTRAP_RESAMPLES = 1000
# Withhold the PGR interval when more than this share of resamples has no PGR.
PGR_UNDEFINED_LIMIT = 0.05


@dataclass(frozen=True)
class SeedPredictions:
    """Test-set probabilities of every model trained with one seed."""

    seed: int
    weak: np.ndarray
    ceiling: np.ndarray
    students: dict[str, np.ndarray]


def _summary(name: str, per_seed: Sequence[float | None], resampled: np.ndarray) -> dict[str, object]:
    summary = metrics.summarize(per_seed)
    return {
        name: summary["mean"],
        f"{name}_std": summary["std"],
        f"{name}_ci": _interval(resampled),
    }


def _interval(resampled: np.ndarray) -> list[float] | None:
    interval = metrics.percentile_interval(resampled)
    return list(interval) if interval is not None else None


def build_results(
    predictions: Sequence[SeedPredictions],
    test_labels: np.ndarray,
    timings: dict[str, float],
) -> dict[str, object]:
    """The results document for one experiment (one or more seeds, all scored on the same test rows)."""
    labels = np.asarray(test_labels)
    n = len(labels)
    truth = labels > 0.5
    losses = list(predictions[0].students)
    probs_of: dict[str, list[np.ndarray]] = {
        "weak": [np.asarray(p.weak) for p in predictions],
        "ceiling": [np.asarray(p.ceiling) for p in predictions],
        **{loss: [np.asarray(p.students[loss]) for p in predictions] for loss in losses},
    }
    models = list(probs_of)

    # Per-example vectors whose resampled means are the figures: correctness (accuracy) and agreement
    # with the weak model, each averaged over seeds (the mean over seeds of a mean over rows).
    columns = [np.mean([(probs > 0.5) == truth for probs in probs_of[m]], axis=0) for m in models]
    columns += [
        np.mean(
            [(s > 0.5) == (w > 0.5) for s, w in zip(probs_of[loss], probs_of["weak"], strict=True)], axis=0
        )
        for loss in losses
    ]
    vectors = np.stack(columns, axis=1).astype(np.float64)  # (n, models + losses)
    means_chunks, auroc_chunks = [], []
    for counts in metrics.bootstrap_counts(n, BOOTSTRAP_RESAMPLES):
        means_chunks.append(counts @ vectors / n)
        per_model = []
        for m in models:
            per_seed = np.stack([metrics.weighted_auroc(counts, probs, labels) for probs in probs_of[m]])
            per_model.append(_mean_of_finite(per_seed))
        auroc_chunks.append(np.stack(per_model, axis=1))
    resampled = np.concatenate(means_chunks)  # (resamples, columns)
    resampled_auroc = np.concatenate(auroc_chunks)  # (resamples, models)
    column = {m: i for i, m in enumerate(models)}

    def model_figures(m: str) -> dict[str, object]:
        accuracy = [metrics.accuracy(probs, labels) for probs in probs_of[m]]
        auroc = [metrics.auroc(probs, labels) for probs in probs_of[m]]
        return _summary("accuracy", accuracy, resampled[:, column[m]]) | _summary(
            "auroc", auroc, resampled_auroc[:, column[m]]
        )

    results: dict[str, object] = {"weak": model_figures("weak"), "ceiling": model_figures("ceiling")}
    weak_mean = float(columns[column["weak"]].mean())
    ceiling_mean = float(columns[column["ceiling"]].mean())
    gap = resampled[:, column["ceiling"]] - resampled[:, column["weak"]]
    gap_ci = _interval(gap)
    results["gap"] = {"ceiling_minus_weak": ceiling_mean - weak_mean, "ceiling_minus_weak_ci": gap_ci}

    flags: list[str] = []
    students: dict[str, object] = {}
    defined = gap > 0
    for offset, loss in enumerate(losses):
        figures = model_figures(loss)
        student = resampled[:, column[loss]]
        undefined_share = float(1.0 - defined.mean())
        point = metrics.pgr(weak_mean, ceiling_mean, float(columns[column[loss]].mean()))
        withheld = point is None or undefined_share > PGR_UNDEFINED_LIMIT
        with np.errstate(all="ignore"):
            pgr_resampled = np.where(defined, (student - resampled[:, column["weak"]]) / gap, np.nan)
        per_seed_pgr = [
            metrics.pgr(metrics.accuracy(w, labels), metrics.accuracy(c, labels), metrics.accuracy(s, labels))
            for w, c, s in zip(probs_of["weak"], probs_of["ceiling"], probs_of[loss], strict=True)
        ]
        figures["pgr"] = point
        figures["pgr_std"] = metrics.summarize(per_seed_pgr)["std"]
        figures["pgr_ci"] = None if withheld else _interval(pgr_resampled)
        figures["pgr_undefined_share"] = undefined_share
        figures["pgr_per_seed"] = per_seed_pgr
        if withheld:
            flags.append("pgr_interval_withheld")
        if any(value is None for value in per_seed_pgr):
            flags.append("pgr_undefined_for_some_seeds")
        agreement_column = len(models) + offset
        figures |= _summary(
            "agreement_with_weak",
            [metrics.agreement(s, w) for s, w in zip(probs_of[loss], probs_of["weak"], strict=True)],
            resampled[:, agreement_column],
        )
        students[loss] = figures
    results["students"] = students
    if gap_ci is not None and gap_ci[0] <= 0.0 <= gap_ci[1]:
        flags.append("ceiling_weak_gap_not_significant")
    results["flags"] = _flags(results, labels) + sorted(set(flags), key=flags.index)
    results["seeds"] = len(predictions)
    results["per_seed"] = [
        {
            "seed": p.seed,
            "weak": metrics.accuracy(p.weak, labels),
            "ceiling": metrics.accuracy(p.ceiling, labels),
            "students": {loss: metrics.accuracy(probs, labels) for loss, probs in p.students.items()},
            "pgr": {loss: students[loss]["pgr_per_seed"][i] for loss in losses},  # type: ignore[index]
        }
        for i, p in enumerate(predictions)
    ]
    results["timings"] = timings
    return results


def _mean_of_finite(values: np.ndarray) -> np.ndarray:
    """Column means over the finite entries (an AUROC is undefined on a one-class resample); NaN where
    a column has none."""
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    total = np.where(finite, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


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
