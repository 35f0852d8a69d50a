"""Shared fixtures: tiny models and a fake sst2 data dir (builders in helpers.py), and a real
S3-compatible server."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    OutageProxy,
    S3Server,
    build_tiny_bert,
    build_tiny_gpt2,
    build_tiny_llama_bf16,
    write_sst2_like,
)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama_bf16(tmp_path_factory.mktemp("models") / "tiny-llama-bf16")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def sst2_dir(tmp_path: Path) -> Path:
    return write_sst2_like(tmp_path / "data")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (moto's server mode) on a free local port, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per S3 request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Settings and credentials that point s3:// stores at the test server (the standard AWS
    variables: what a deployment's credential chain provides)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("W2S_STORE_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("W2S_STORE_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def s3_outage(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[OutageProxy]:
    """The test S3 server behind a proxy the test can take down (``down()``) and bring back
    (``up()``); s3:// stores reach the server through it."""
    proxy = OutageProxy(s3_env.port)
    monkeypatch.setenv("W2S_STORE_ENDPOINT_URL", proxy.url)
    try:
        yield proxy
    finally:
        proxy.down()


# -- skips in CI -------------------------------------------------------------------------------------
# CI (.ci/run sets W2S_CI=1) fails a run in which a test was skipped for a reason not listed in
# tests/ci_skips.txt: a skip there means a check quietly did not run.
CI_SKIPS = Path(__file__).with_name("ci_skips.txt")
_skipped: list[tuple[str, str]] = []


def _allowed_skips() -> list[tuple[str, str]]:
    """(test id prefix, text its reason contains) of each listed skip that says why CI may skip it."""
    allowed = []
    for line in CI_SKIPS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            where, reason, why = (part.strip() for part in [*line.split("|", 2), "", ""][:3])
            if why:
                allowed.append((where, reason))
    return allowed


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, str(reason)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import os

    if os.environ.get("W2S_CI") != "1" or not _skipped:
        return
    allowed = _allowed_skips()
    unexpected = [
        (nodeid, reason)
        for nodeid, reason in _skipped
        if not any(nodeid.startswith(where) and text in reason for where, text in allowed)
    ]
    if unexpected:
        lines = "\n".join(f"  {nodeid}: {reason}" for nodeid, reason in unexpected)
        print(f"\nCI: {len(unexpected)} test(s) skipped for a reason not in tests/ci_skips.txt:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- progress in CI logs -----------------------------------------------------------------------------
# pytest writes a test's result only when it ends, and some slow tests run for minutes: a CI log went
# silent for 12 min. Where the output is not a terminal, or W2S_CI=1, a background thread prints
# "[still running <test id>, 40 s]" every W2S_TEST_HEARTBEAT_S seconds (10; 0: never) while one test,
# or the collection, runs. It writes to pytest's own stdout (a copy of the file descriptor taken
# while capture is suspended), so the capture of the test's output does not swallow the line.
class _Heartbeat:
    def __init__(self, config: pytest.Config, every: float) -> None:
        self.config = config
        self.fd = os.dup(1)
        self.every = every
        self.lock = threading.Lock()
        self.what: str | None = None
        self.since = self.due = 0.0
        self.width = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="w2s-test-heartbeat", daemon=True)
        self.thread.start()

    def _track(self, what: str | None) -> None:
        with self.lock:
            self.what, self.since, self.due = what, time.monotonic(), self.every
            self.width = 0  # of pytest's current line when this thread last wrote

    def _beat(self) -> None:
        while not self.stopped.wait(0.5):
            with self.lock:
                elapsed = time.monotonic() - self.since
                if self.what is None or elapsed < self.due:
                    continue
                self.due += self.every
                # On a line of its own: pytest may have written part of one (-v: the test's id and, once
                # the call ends, its result; -q: dots), and it does not know what this thread writes.
                reporter = self.config.pluginmanager.get_plugin("terminalreporter")
                width = reporter._tw.width_of_current_line if reporter is not None else 0
                midline = width > 0 and width != self.width
                self.width = width
                line = f"{chr(10) if midline else ''}[still {self.what}, {elapsed:.0f} s]\n"
            try:
                os.write(self.fd, line.encode())
            except OSError:
                return

    def pytest_collection(self) -> None:
        self._track("collecting tests")

    def pytest_collection_finish(self) -> None:
        self._track(None)

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._track(f"running {nodeid}")

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self) -> None:
        # pytest flushes a test's result line only when the next test starts: after a long teardown.
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.flush()

    def pytest_runtest_logfinish(self) -> None:
        self._track(None)

    def pytest_unconfigure(self) -> None:
        self.stopped.set()
        self.thread.join()
        os.close(self.fd)


def pytest_configure(config: pytest.Config) -> None:
    every = float(os.environ.get("W2S_TEST_HEARTBEAT_S", "10"))
    if every > 0 and (os.environ.get("W2S_CI") == "1" or not os.isatty(1)):
        config.pluginmanager.register(_Heartbeat(config, every), "w2s-heartbeat")
