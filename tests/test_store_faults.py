"""Store faults are weather: a call that meets a transient error is tried again with back-off and
jitter until the store answers or the budget (W2S_STORE_RETRY_S) is spent; a permanent answer (no
such key) is not retried. Against a real S3-compatible server behind a proxy taken down mid-write."""

from __future__ import annotations

import threading
import time

import pytest

from helpers import OutageProxy, S3Server
from w2s.store import ArtifactStore, StoreUnavailable, with_retries


def test_transient_errors_are_retried_until_the_call_succeeds() -> None:
    calls, slept = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("connection refused")
        return "stored"

    assert with_retries(flaky, "put blob", budget_s=60, sleep=slept.append) == "stored"
    assert len(calls) == 4 and len(slept) == 3
    assert all(0 <= delay <= 0.5 * 2**i for i, delay in enumerate(slept))  # full jitter, doubling


def test_a_permanent_answer_is_not_retried() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "get record", budget_s=60, sleep=lambda _: None)
    assert len(calls) == 1


def test_past_the_budget_the_store_is_unavailable_naming_the_call() -> None:
    def down() -> None:
        raise TimeoutError("read timed out")

    with pytest.raises(StoreUnavailable, match=r"did not answer for \d+ s \(put blob ab12\): TimeoutError"):
        with_retries(down, "put blob ab12", budget_s=0.2, sleep=time.sleep)


def test_a_write_during_an_s3_outage_lands_when_the_store_is_back(
    s3_outage: OutageProxy, s3_env: S3Server
) -> None:
    store = ArtifactStore(s3_env.new_bucket(), retry_s=60)
    store.put_record("stages", "ab" * 32, {"accuracy": 0.5})
    s3_outage.down()
    back = threading.Timer(3.0, s3_outage.up)
    back.start()
    started = time.monotonic()
    store.put_record("stages", "cd" * 32, {"accuracy": 0.75})  # waits out the outage
    assert time.monotonic() - started >= 2.5
    assert store.get_record("stages", "cd" * 32) == {"accuracy": 0.75}


def test_an_outage_longer_than_the_budget_says_the_store_is_unavailable(
    s3_outage: OutageProxy, s3_env: S3Server
) -> None:
    store = ArtifactStore(s3_env.new_bucket(), retry_s=1)
    s3_outage.down()
    with pytest.raises(StoreUnavailable, match="the artifact store did not answer"):
        store.get_record("stages", "ab" * 32)
    s3_outage.up()
    assert store.get_record("stages", "ab" * 32) is None  # back: a missing record is just missing
