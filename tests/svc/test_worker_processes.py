"""The stage worker's processes: full and LoRA stages in a process of their own, probe stages in the
long-lived one with what it keeps in memory, and the dispatcher woken by commits.

A stage in its own process must give exactly what it gives in-process (the same numbers, the same
progress, the same errors), stop when told, and fail as a lost attempt when that process dies.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session

from helpers import write_sst2_like
from w2s import train
from w2s.spec import parse_spec
from w2s.splits import prepare_seed_data
from w2s.stages import STAGES, StageCancelled, StagePlan, plan_weak, run_stage
from w2s.store import ArtifactStore
from worker.isolation import IsolatedStageLost, run_isolated
from worker.stage_cache import CachingStore


def full_plan(model: Path, data_dir: Path, epochs: int = 2) -> StagePlan:
    options = {"mode": "full", "epochs": epochs, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec = parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 120, "n_test": 40, "seed": 0},
            "weak": {"model": str(model), **options},
            "strong": {"model": str(model), **options},
            "losses": ["xent"],
            "seeds": [0],
        }
    )
    return plan_weak(spec, 0, prepare_seed_data(spec, 0, data_dir), device_kind="cpu")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_sst2_like(tmp_path / "data")


def test_a_stage_in_its_own_process_gives_what_it_gives_in_process(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    plan = full_plan(tiny_bert, data_dir)
    here_steps: list[int] = []
    here = run_stage(
        plan, ArtifactStore(str(tmp_path / "a")), callback=lambda p: here_steps.append(p.step) is None
    )
    there_steps: list[int] = []
    store = ArtifactStore(str(tmp_path / "b"))
    there = run_isolated(plan, store.uri, lambda p: there_steps.append(p.step) is None)
    assert there_steps == here_steps and there.steps == here.steps > 0
    assert there.accuracy == pytest.approx(here.accuracy, abs=1e-6)
    np.testing.assert_allclose(
        store.get_array(there.test_probs),
        ArtifactStore(str(tmp_path / "a")).get_array(here.test_probs),
        atol=1e-5,
    )
    assert store.get_record(STAGES, plan.key) is not None  # the child stored its result


def test_a_stage_in_its_own_process_stops_when_told(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    plan = full_plan(tiny_bert, data_dir, epochs=50)
    store = ArtifactStore(str(tmp_path / "s"))
    seen: list[int] = []

    def stop_after_two(progress: train.Progress) -> bool:
        seen.append(progress.step)
        return progress.step < 2

    with pytest.raises(StageCancelled):
        run_isolated(plan, store.uri, stop_after_two)
    assert seen[:2] == [1, 2] and len(seen) < 10  # it stopped within a step or two, not after 50 epochs
    assert store.get_record(STAGES, plan.key) is None
    assert not multiprocessing.active_children()  # and its process is gone


def test_an_error_in_its_own_process_keeps_its_type(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_bert, tmp_path / "model")
    plan = full_plan(model, data_dir)
    (model / "config.json").write_text("{ not json")  # it breaks between planning and running
    with pytest.raises(Exception) as here:
        run_stage(plan, ArtifactStore(str(tmp_path / "a")))
    with pytest.raises(Exception) as there:
        run_isolated(plan, str(tmp_path / "b"), lambda _: True)
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value)


def test_a_killed_stage_process_is_a_lost_attempt(tiny_bert: Path, data_dir: Path, tmp_path: Path) -> None:
    plan = full_plan(tiny_bert, data_dir, epochs=50)

    def kill_it(progress: train.Progress) -> bool:
        if progress.step == 1:
            for child in multiprocessing.active_children():
                if child.name.startswith("stage-"):
                    os.kill(child.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        return True

    started = time.monotonic()
    with pytest.raises(IsolatedStageLost, match="exit code -9"):
        run_isolated(plan, str(tmp_path / "s"), kill_it)
    assert time.monotonic() - started < 60


def test_the_process_store_keeps_arrays_and_feature_records_within_its_budget(tmp_path: Path) -> None:
    uri = str(tmp_path / "store")
    arrays = [np.full(1000, i, dtype=np.float32) for i in range(4)]  # 4,000 bytes each
    digests = [ArtifactStore(uri).put_array(a) for a in arrays]
    store = CachingStore(uri, budget_bytes=10_000)  # room for two
    for digest, array in zip(digests, arrays, strict=True):
        np.testing.assert_array_equal(store.get_array(digest), array)
    assert store.used_bytes <= 10_000 and store.misses == 4
    store.get_array(digests[3])
    assert store.hits == 1  # the most recent ones stayed
    store.get_array(digests[0])
    assert store.misses == 5  # the oldest went first
    with pytest.raises(ValueError):
        store.get_array(digests[3])[0] = 7.0  # shared between stages: read-only
    # Feature shard records never change: cached. Stage results may appear at any moment: read through.
    ArtifactStore(uri).put_record("features/bert", "shard", {"texts": ["a"]})
    assert store.get_record("features/bert", "shard") == {"texts": ["a"]}
    assert store.get_record(STAGES, "later") is None
    ArtifactStore(uri).put_record(STAGES, "later", {"accuracy": 0.5})
    assert store.get_record(STAGES, "later") == {"accuracy": 0.5}


def test_a_commit_wakes_the_dispatcher_and_a_rollback_does_not(service_env: dict[str, str]) -> None:
    from service.db import get_engine
    from service.lifecycle import wake_dispatcher
    from service.settings import get_settings
    from worker.dispatcher import Wakeup

    wakeup = Wakeup(get_settings(), threading.Event())
    try:
        assert wakeup.wait(0.05) is False  # listening now; nothing said
        with Session(get_engine()) as session:
            wake_dispatcher(session)
            session.rollback()
        assert wakeup.wait(0.3) is False
        with Session(get_engine()) as session:
            wake_dispatcher(session)
            wake_dispatcher(session)  # folded into one
            session.commit()
        started = time.monotonic()
        assert wakeup.wait(5.0) is True
        assert time.monotonic() - started < 1.0
        assert wakeup.wait(0.2) is False  # both notifications were taken by that one wake-up
    finally:
        wakeup.close()


def test_on_sqlite_a_commit_wakes_the_dispatcher_through_its_wake_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded default has no NOTIFY: a commit that makes work due touches a file the
    dispatcher watches, so a stage follows another at once instead of after the interval."""
    from service.db import get_engine, reset_caches
    from service.lifecycle import wake_dispatcher
    from service.settings import get_settings
    from worker.dispatcher import Wakeup

    monkeypatch.delenv("W2S_DATABASE_URL", raising=False)
    monkeypatch.setenv("W2S_STATE_DIR", str(tmp_path))
    reset_caches()
    try:
        wakeup = Wakeup(get_settings(), threading.Event())
        assert wakeup.wake_file is not None and wakeup.wait(0.05) is False
        with Session(get_engine()) as session:
            wake_dispatcher(session)
            session.rollback()
        assert wakeup.wait(0.2) is False  # a rollback says nothing
        with Session(get_engine()) as session:
            wake_dispatcher(session)
            session.commit()
        started = time.monotonic()
        assert wakeup.wait(5.0) is True
        assert time.monotonic() - started < 0.2
        assert wakeup.wait(0.1) is False
    finally:
        reset_caches()


def test_stopping_the_fork_server_leaves_no_temporary_folder(
    tiny_bert: Path, data_dir: Path, tmp_path: Path
) -> None:
    from worker import isolation

    run_isolated(full_plan(tiny_bert, data_dir, epochs=1), str(tmp_path / "s"), lambda _: True)
    tempdir = multiprocessing.current_process()._config.get("tempdir")  # type: ignore[attr-defined]
    assert tempdir and Path(tempdir).is_dir()  # the fork server's socket lives there
    isolation.stop_fork_server()
    assert not Path(tempdir).exists()
    # A later stage starts a fresh fork server.
    assert run_isolated(full_plan(tiny_bert, data_dir, epochs=1), str(tmp_path / "t"), lambda _: True).steps


def test_only_stage_workers_start_a_fork_server_ahead_of_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import isolation, tasks

    started = threading.Event()
    monkeypatch.setattr(isolation, "start_fork_server", started.set)
    monkeypatch.setattr(tasks, "ISOLATE_HEAVY_STAGES", False)  # _long_lived sets it; restored after
    monkeypatch.setattr(tasks, "RUNS_STAGES", False)  # `w2s-service worker --queue control`
    tasks._long_lived()
    assert not started.wait(0.5)
    monkeypatch.setattr(tasks, "RUNS_STAGES", True)
    tasks._long_lived()
    assert started.wait(5.0)


def test_a_round_is_skipped_while_another_dispatcher_is_in_one(service_env: dict[str, str]) -> None:
    from service.settings import get_settings

    """Two dispatchers never run a round at once: the one that does not get the advisory lock skips."""
    import psycopg

    from worker.dispatcher import DISPATCH_LOCK_ID, run_round

    url = service_env["W2S_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s)", (DISPATCH_LOCK_ID,))  # the other's round
        assert run_round(get_settings(), celery_app=None) is None  # type: ignore[arg-type]
    assert run_round(get_settings(), celery_app=None) is not None  # type: ignore[arg-type]
