"""The processes of ``w2s-service dev``: started together, each one that exits started again (said
on stderr with its exit code and restart count, later and later while it keeps crashing), and all
stopped together on Ctrl-C or SIGTERM.

A crashed worker used to make ``dev`` stop every process, so one lost child ended every job in
flight; the service recovers the crashed one's work by itself (a stage whose worker went silent is
requeued, a lost control task is sent again), given a worker to run it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The wait before restarting a process that exited: the first, doubled for each exit in a row that
# came soon after its start (a crash loop: a port taken, a broken setting), at most the last.
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
# A process that ran this long before it exited was not crash-looping: its next wait is the first.
STABLE_AFTER_S = 60.0


def stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Child:
    name: str  # what the log lines call it, e.g. "worker --queue cpu"
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    started_at: float
    restarts: int = 0
    quick_exits: int = 0  # exits in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None  # set while it waits to be started again


def exit_description(code: int) -> str:
    """``code 3``, or ``code -9 (SIGKILL)`` for a process a signal ended."""
    if code < 0:
        try:
            return f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"code {code}"


class Supervisor:
    def __init__(
        self,
        commands: Sequence[tuple[str, list[str], dict[str, str]]],
        say: Callable[[str], None] = stderr_line,
    ):
        """``commands``: each process's name, argv and environment."""
        self.say = say
        now = time.monotonic()
        self.children = [
            Child(name, command, env, subprocess.Popen(command, env=env), now)
            for name, command, env in commands
        ]

    def run(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Watch the processes until ``stop`` is set, restarting each one that exits."""
        while not stop.is_set():
            self.check(stop)
            stop.wait(poll_s)

    def check(self, stop: threading.Event) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is None:
                code = child.process.poll()
                if code is not None:
                    self._schedule_restart(child, code, now)
            if child.restart_at is not None and now >= child.restart_at and not stop.is_set():
                self._restart(child, now)

    def _schedule_restart(self, child: Child, code: int, now: float) -> None:
        child.quick_exits = child.quick_exits + 1 if now - child.started_at < STABLE_AFTER_S else 0
        delay = min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** max(child.quick_exits - 1, 0))
        child.restart_at = now + delay
        self.say(
            f"w2s-service: {child.name} (pid {child.process.pid}) exited with {exit_description(code)}; "
            f"restarting it in {delay:g} s (restart {child.restarts + 1})"
            + (f", after {child.quick_exits} quick exits in a row" if child.quick_exits > 1 else "")
        )

    def _restart(self, child: Child, now: float) -> None:
        child.process = subprocess.Popen(child.command, env=child.env)
        child.started_at, child.restart_at = now, None
        child.restarts += 1
        self.say(f"w2s-service: {child.name} restarted (pid {child.process.pid}, restart {child.restarts})")

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM to every process still running, SIGKILL to any still there after ``grace_s``."""
        running = [child.process for child in self.children if child.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
