"""Run a whole experiment in this process: every seed's weak, ceiling and student stages.

This is what ``w2s run`` calls; the service runs the same stages one task at a time instead.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from w2s.models import model_fingerprint
from w2s.results import SeedPredictions, build_results
from w2s.spec import JobSpec, ModelSpec, TrainConfig, resolved_models
from w2s.splits import SPLITS, SeedData, prepare_seed_data
from w2s.stages import (
    StagePlan,
    StageResult,
    chain_kind,
    library_versions,
    pick_device,
    plan_seed,
    run_stage,
    student_kind,
)
from w2s.store import ArtifactStore
from w2s.train import Progress, ProgressCallback

logger = logging.getLogger(__name__)


class Reporter(Protocol):
    """Receives stage events; the CLI draws progress bars with them."""

    def stage_started(self, plan: StagePlan) -> None: ...

    def stage_progress(self, plan: StagePlan, progress: Progress) -> bool | None: ...

    def stage_finished(self, plan: StagePlan, result: StageResult) -> None: ...


@dataclass
class Experiment:
    results: dict[str, Any]
    manifest: dict[str, Any]
    stages: list[StageResult]


Models = dict[str, tuple[ModelSpec, TrainConfig]]


def prepare_data(spec: JobSpec, data_dir: Path | None, models: Models | None = None) -> dict[int, SeedData]:
    """Every seed's clean data (each seed draws its own train sample unless resample_per_seed is off)."""
    models = models or resolved_models(spec)
    return {seed: prepare_seed_data(spec, seed, data_dir, models) for seed in spec.seeds}


def plan_experiment(
    spec: JobSpec,
    data: dict[int, SeedData],
    *,
    device_kind: str,
    models: Models | None = None,
    probe_head_device_kind: str | None = None,
    scope: str | None = None,
) -> list[StagePlan]:
    """Every stage in run order: per seed, weak, ceiling, then one student per loss (see
    w2s.stages.plan_seed for ``probe_head_device_kind`` and ``scope``)."""
    models = models or resolved_models(spec)
    return [
        plan
        for seed in spec.seeds
        for plan in plan_seed(
            spec,
            data[seed],
            device_kind=device_kind,
            models=models,
            probe_head_device_kind=probe_head_device_kind,
            scope=scope,
        )
    ]


def data_report(spec: JobSpec, data: dict[int, SeedData], models: Models | None = None) -> dict[str, Any]:
    """The results' ``data`` block: how the rows were drawn and cleaned, and per split the rows used,
    dropped as too long, truncated, and removed for overlap (per seed, and the mean over seeds)."""
    models = models or resolved_models(spec)
    config = spec.data_config()
    per_seed = [
        {
            "seed": seed,
            "train_seed": data[seed].drawn.train_seed,
            **{split: data[seed].counts[split].to_dict() for split in SPLITS},
        }
        for seed in spec.seeds
    ]
    fields = ("rows", "dropped_too_long", "truncated", "overlap_removed")
    return {
        "sampling": config.sampling,
        "resample_per_seed": config.resample_per_seed,
        "remove_overlap": config.remove_overlap,
        "max_dropped_fraction": config.max_dropped_fraction,
        "models": {
            role: {"max_length": train.max_length, "truncation": train.truncation}
            for role, (_, train) in models.items()
        },
        # The test split is the same for every seed; the halves' counts are means over seeds.
        "splits": {
            split: {name: float(np.mean([entry[split][name] for entry in per_seed])) for name in fields}
            for split in SPLITS
        },
        "per_seed": per_seed,
    }


def experiment_results(
    spec: JobSpec,
    data: dict[int, SeedData],
    test_probs: Callable[[str, int], np.ndarray],
    timings: dict[str, float],
    models: Models | None = None,
) -> dict[str, Any]:
    """The results document of a finished experiment, from each stage's test probabilities
    (``test_probs(kind, seed)``). The library and the service both build results here."""
    test_labels = np.asarray(data[spec.seeds[0]].test.labels)
    return results_document(spec, test_labels, data_report(spec, data, models), test_probs, timings)


def results_document(
    spec: JobSpec,
    test_labels: np.ndarray,
    data_block: dict[str, Any],
    test_probs: Callable[[str, int], np.ndarray],
    timings: dict[str, float],
) -> dict[str, Any]:
    """:func:`experiment_results` from what planning recorded (the test labels, the data block),
    without the data itself: the service's finishing task reads no dataset."""
    predictions = [
        SeedPredictions(
            seed=seed,
            weak=test_probs("weak", seed),
            ceiling=test_probs("ceiling", seed),
            students={loss.label: test_probs(student_kind(loss), seed) for loss in spec.losses},
        )
        for seed in spec.seeds
    ]
    results = build_results(predictions, test_labels, timings)
    results["data"] = data_block
    if spec.chain:
        results["chain"] = chain_results(spec, test_probs, test_labels)
    return results


def _pick(figures: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: figures.get(name) for name in names if name in figures}


MODEL_FIGURES = ("accuracy", "accuracy_std", "accuracy_ci", "auroc")
STUDENT_FIGURES = (*MODEL_FIGURES, "pgr", "pgr_std", "pgr_ci", "pgr_undefined_share")


def chain_results(
    spec: JobSpec, test_probs: Callable[[str, int], np.ndarray], test_labels: np.ndarray
) -> dict[str, Any]:
    """The results' ``chain`` block (bootstrapping). Per loss: each hop, model i's labels teaching model
    i+1, with the supervisor's, the student's and model i+1's own ceiling's figures and the hop's PGR
    (against that ceiling); and end to end, the chain's last student and the direct weak -> strong
    student, both with PGR against the strong ceiling, from one joint bootstrap so they compare."""
    names = [model.model for _, model in spec.named_models()]
    last = len(names)

    def ceiling_kind(position: int) -> str:
        return "ceiling" if position == last else f"ceiling@{position}"

    def figures(weak: str, ceiling: str, students: dict[str, str]) -> dict[str, Any]:
        predictions = [
            SeedPredictions(
                seed=seed,
                weak=test_probs(weak, seed),
                ceiling=test_probs(ceiling, seed),
                students={name: test_probs(kind, seed) for name, kind in students.items()},
            )
            for seed in spec.seeds
        ]
        return build_results(predictions, test_labels, timings={})

    losses: dict[str, Any] = {}
    for loss in spec.losses:
        hops = []
        for position in range(2, last + 1):
            supervisor = "weak" if position == 2 else chain_kind(position - 1, loss)
            hop = figures(supervisor, ceiling_kind(position), {"student": chain_kind(position, loss)})
            hops.append(
                {
                    "supervisor": names[position - 2],
                    "student": names[position - 1],
                    "supervisor_figures": _pick(hop["weak"], *MODEL_FIGURES),
                    "ceiling_figures": _pick(hop["ceiling"], *MODEL_FIGURES),
                    "student_figures": _pick(hop["students"]["student"], *STUDENT_FIGURES),
                    "flags": hop["flags"],
                }
            )
        ends = figures("weak", "ceiling", {"chain": chain_kind(last, loss), "direct": student_kind(loss)})
        losses[loss.label] = {
            "hops": hops,
            "end_to_end": {
                "chain": _pick(ends["students"]["chain"], *STUDENT_FIGURES),
                "direct": _pick(ends["students"]["direct"], *STUDENT_FIGURES),
                "flags": ends["flags"],
            },
        }
    return {"models": names, "losses": losses}


def run_experiment(
    spec: JobSpec,
    *,
    store: ArtifactStore,
    data_dir: Path | None = None,
    device: torch.device | None = None,
    reporter: Reporter | None = None,
) -> Experiment:
    started_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    device_kind = (device or pick_device()).type
    models = resolved_models(spec)
    data = prepare_data(spec, data_dir, models)
    logger.info("dataset %s", data[spec.seeds[0]].summary())
    plans = plan_experiment(spec, data, device_kind=device_kind, models=models)

    stage_results: list[StageResult] = []
    for plan in plans:
        callback: ProgressCallback | None = None
        if reporter is not None:
            reporter.stage_started(plan)
            callback = _bind(reporter.stage_progress, plan)
        result = run_stage(plan, store, callback=callback)
        if reporter is not None:
            reporter.stage_finished(plan, result)
        stage_results.append(result)

    by_kind_seed = {(r.kind, r.seed): r for r in stage_results}
    timings: dict[str, float] = {}
    for result in stage_results:
        timings[result.kind] = timings.get(result.kind, 0.0) + (0.0 if result.cached else result.seconds)
    timings["total"] = time.perf_counter() - started
    results = experiment_results(
        spec, data, lambda kind, seed: store.get_array(by_kind_seed[kind, seed].test_probs), timings, models
    )
    manifest = {
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "versions": {**library_versions(), "python": platform.python_version()},
        "device": str(device or pick_device()),
        "device_kind": device_kind,
        "spec": spec.model_dump(mode="json"),
        "dataset": {str(seed): data[seed].summary() for seed in spec.seeds},
        "training": {role: {k: v for k, v in vars(train).items()} for role, (_, train) in models.items()},
        "models": {name: model_fingerprint(model) for name, model in spec.named_models()},
        "seeds": spec.seeds,
        "stages": [
            {"kind": r.kind, "seed": r.seed, "key": r.key, "cached": r.cached, "seconds": r.seconds}
            for r in stage_results
        ],
    }
    return Experiment(results=results, manifest=manifest, stages=stage_results)


def _bind(
    handler: Callable[[StagePlan, Progress], bool | None], plan: StagePlan
) -> Callable[[Progress], bool | None]:
    return lambda progress: handler(plan, progress)
