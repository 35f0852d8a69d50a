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

from w2s.datasets import CustomSource, DatasetSplits, load_splits
from w2s.models import model_fingerprint
from w2s.results import SeedPredictions, build_results
from w2s.spec import CustomDatasetSpec, DatasetSpec, JobSpec
from w2s.stages import (
    StagePlan,
    StageResult,
    library_versions,
    pick_device,
    plan_ceiling,
    plan_student,
    plan_weak,
    run_stage,
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


def load_dataset_for(spec: JobSpec, data_dir: Path | None) -> DatasetSplits:
    return load_dataset(spec.dataset, data_dir)


def load_dataset(dataset: DatasetSpec, data_dir: Path | None) -> DatasetSplits:
    source = None
    if isinstance(dataset.name, CustomDatasetSpec):
        source = CustomSource(**dataset.name.model_dump())
    return load_splits(
        name=dataset.name if isinstance(dataset.name, str) else None,
        source=source,
        n_train=dataset.n_train,
        n_test=dataset.n_test,
        seed=dataset.seed,
        data_dir=data_dir,
    )


def plan_experiment(spec: JobSpec, splits: DatasetSplits) -> list[StagePlan]:
    """Every stage in run order: per seed, weak, ceiling, then one student per loss."""
    plans = []
    for seed in spec.seeds:
        plans.append(plan_weak(spec, seed, splits))
        plans.append(plan_ceiling(spec, seed, splits))
        plans.extend(plan_student(spec, loss, seed, splits) for loss in spec.losses)
    return plans


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
    device = device or pick_device()
    splits = load_dataset_for(spec, data_dir)
    logger.info("dataset %s", splits.summary())
    plans = plan_experiment(spec, splits)

    stage_results: list[StageResult] = []
    for plan in plans:
        callback: ProgressCallback | None = None
        if reporter is not None:
            reporter.stage_started(plan)
            callback = _bind(reporter.stage_progress, plan)
        result = run_stage(plan, store, device=device, callback=callback)
        if reporter is not None:
            reporter.stage_finished(plan, result)
        stage_results.append(result)

    by_kind_seed = {(r.kind, r.seed): r for r in stage_results}
    predictions = [
        SeedPredictions(
            seed=seed,
            weak=store.get_array(by_kind_seed["weak", seed].test_probs),
            ceiling=store.get_array(by_kind_seed["ceiling", seed].test_probs),
            students={
                loss.label: store.get_array(by_kind_seed[f"student:{loss.label}", seed].test_probs)
                for loss in spec.losses
            },
        )
        for seed in spec.seeds
    ]
    timings: dict[str, float] = {}
    for result in stage_results:
        timings[result.kind] = timings.get(result.kind, 0.0) + (0.0 if result.cached else result.seconds)
    timings["total"] = time.perf_counter() - started
    results = build_results(predictions, np.asarray(splits.test.labels), timings)
    manifest = {
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "versions": library_versions() | {"python": platform.python_version()},
        "device": str(device),
        "spec": spec.model_dump(mode="json"),
        "dataset": splits.summary(),
        "models": {"weak": model_fingerprint(spec.weak), "strong": model_fingerprint(spec.strong)},
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
