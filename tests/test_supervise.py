"""`w2s-service dev`'s supervisor (w2s_service/supervise.py) on real processes: one that exits is
started again and said so, later each time it crash-loops; a stop ends them all and restarts none.
The live case (dev's worker killed mid-job) is in tests/test_embedded_broker.py."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import pytest

from w2s_service import supervise
from w2s_service.supervise import Supervisor


def run_until(
    supervisor: Supervisor, stop: threading.Event, done: Callable[[], bool], timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        supervisor.check(stop)
        time.sleep(0.01)
    assert done()


def test_a_crash_looping_process_is_restarted_later_each_time_and_said_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervise, "FIRST_RESTART_DELAY_S", 0.05)
    said: list[str] = []
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    supervisor = Supervisor([("crasher", crash, {})], say=said.append)
    stop = threading.Event()
    run_until(supervisor, stop, lambda: supervisor.children[0].restarts == 3)
    exits = [line for line in said if "exited" in line]
    assert [line.split("restarting it in ")[1] for line in exits] == [
        "0.05 s (restart 1)",
        "0.1 s (restart 2), after 2 quick exits in a row",
        "0.2 s (restart 3), after 3 quick exits in a row",
    ]
    assert all("crasher (pid " in line and "exited with code 3;" in line for line in exits)
    assert [line for line in said if "restarted" in line][-1].endswith("restart 3)")
    supervisor.stop_all()


def test_a_process_killed_by_a_signal_is_named_with_it_and_stop_restarts_nothing() -> None:
    said: list[str] = []
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = Supervisor([("sleeper", sleeper, {}), ("other", sleeper, {})], say=said.append)
    first, other = (child.process for child in supervisor.children)
    first.kill()
    first.wait()
    stop = threading.Event()
    supervisor.check(stop)
    assert said == [
        f"w2s-service: sleeper (pid {first.pid}) exited with code -9 (SIGKILL); "
        "restarting it in 1 s (restart 1)"
    ]
    stop.set()  # Ctrl-C before the restart is due
    time.sleep(supervise.FIRST_RESTART_DELAY_S + 0.1)
    supervisor.check(stop)
    supervisor.stop_all(grace_s=10)
    assert supervisor.children[0].process is first and supervisor.children[0].restarts == 0
    assert other.returncode == -15  # SIGTERM
