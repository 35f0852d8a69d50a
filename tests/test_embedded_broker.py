"""The embedded default's broker (worker/embedded_broker.py) through the connection the Celery app
makes: a message file is never read torn, and several processes on one queue folder lose nothing.

kombu's own filesystem transport fails both: its writer creates the message file and then writes
it, and a consumer listing the folder in between raised ``JSONDecodeError`` ("Unrecoverable error":
the worker stopped, kombu issue #1551) and deleted the message.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import filesystem
from test_readme import ROOT, TimedLines, _ready, free_port

from helpers import write_sst2_like
from service.settings import Settings
from worker.celery_app import make_celery


@pytest.fixture(autouse=True)
def fresh_broker_state() -> None:
    """kombu keeps the filesystem transport's bindings in one object per process, so a binding made
    for another test's folder would be taken as made for this one (and its table never written)."""
    filesystem.Transport.global_state.clear()


def embedded_connection(state_dir: Path) -> Connection:
    settings = Settings(state_dir=state_dir, broker_url="", database_url=f"sqlite:///{state_dir}/db")
    return make_celery(settings).connection_for_write()


def queue_folder(state_dir: Path) -> Path:
    return state_dir / "broker" / "queue"


def publish(connection: Connection, body: dict[str, Any]) -> None:
    """As the dispatcher sends a task: the queue declared, then to its exchange, named after it
    (worker/celery_app.py). A new Queue each time: declaring binds one to the channel."""
    cpu = Queue("cpu", Exchange("cpu", "direct"), routing_key="cpu")
    Producer(connection.default_channel).publish(
        body, exchange=cpu.exchange, routing_key="cpu", declare=[cpu], serializer="json"
    )


def test_a_message_caught_between_its_file_creation_and_its_write_is_read_once_whole(
    tmp_path: Path,
) -> None:
    with embedded_connection(tmp_path) as connection:
        publish(connection, {"stage": 1})
        (written,) = queue_folder(tmp_path).glob("*.cpu.msg")
        content = written.read_bytes()
        written.unlink()
        channel = connection.channel()
        # A writer of kombu's kind: the file exists, empty, before its bytes arrive.
        with open(written, "wb", buffering=0) as writer:
            assert channel.basic_get("cpu", no_ack=True) is None  # skipped, not a crash
            assert written.exists(), "the message being written was taken away from its writer"
            writer.write(content)
        message = channel.basic_get("cpu", no_ack=True)
        assert message is not None and message.decode() == {"stage": 1}
        assert channel.basic_get("cpu", no_ack=True) is None
        assert not any(queue_folder(tmp_path).iterdir())


def _write(state_dir: Path, count: int) -> None:
    with embedded_connection(state_dir) as connection:
        for index in range(count):
            publish(connection, {"index": index, "padding": "x" * 2000})


def _consume(state_dir: Path, done: Any, results: Any) -> None:
    received, errors = [], []
    with embedded_connection(state_dir) as connection:
        channel = connection.channel()
        while True:
            finished = done.is_set()  # read before the last poll: nothing arrives after it
            try:
                message = channel.basic_get("cpu", no_ack=True)
            except Exception as error:  # what a Celery worker would have stopped on
                errors.append(repr(error))
                continue
            if message is not None:
                received.append(message.decode()["index"])
            elif finished:
                break
    results.put((received, errors))


def test_a_writer_and_two_consumers_in_separate_processes_tear_and_lose_nothing(tmp_path: Path) -> None:
    """The embedded stack's shape: one process publishes while two others read the same folder
    (the cpu worker, the control worker). Every message arrives once, whole."""
    count = 2000
    context = multiprocessing.get_context("fork")
    done, results = context.Event(), context.Queue()
    consumers = [context.Process(target=_consume, args=(tmp_path, done, results)) for _ in range(2)]
    for consumer in consumers:
        consumer.start()
    writer = context.Process(target=_write, args=(tmp_path, count))
    writer.start()
    writer.join(timeout=120)
    assert writer.exitcode == 0
    done.set()
    outcomes = []
    deadline = time.monotonic() + 60
    while len(outcomes) < len(consumers) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            outcomes.append(results.get(timeout=1))
    for consumer in consumers:
        consumer.join(timeout=10)
    assert len(outcomes) == len(consumers)
    errors = [error for _, found in outcomes for error in found]
    assert errors == []
    received = sorted(index for got, _ in outcomes for index in got)
    assert received == list(range(count))  # none lost, none twice
    assert not [name for name in os.listdir(queue_folder(tmp_path)) if name.endswith(".msg")]


# `w2s-service dev` itself, on the embedded default: its cpu worker meets a message file being
# written, and is killed mid-job.


@dataclass
class DevStack:
    process: subprocess.Popen[bytes]
    lines: TimedLines
    api: str
    headers: dict[str, str]
    state_dir: Path
    tiny_bert: Path

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines.lines)

    def child(self, arguments: str) -> int:
        """The pid of dev's child process started with ``arguments`` (e.g. "worker --queue cpu")."""
        found = [pid for pid, argv in children_of(self.process.pid).items() if argv.endswith(arguments)]
        assert len(found) == 1, f"dev's children: {children_of(self.process.pid)}"
        return found[0]

    def submit(self, seeds: int) -> str:
        options = {"mode": "probe", "max_length": 32, "epochs": 2}
        spec = {
            "dataset": {"name": "sst2", "n_train": 200, "n_test": 60},
            "weak": {"model": str(self.tiny_bert), **options},
            "strong": {"model": str(self.tiny_bert), **options},
            "losses": ["xent", "logconf"],
            "seeds": list(range(seeds)),
        }
        answer = httpx.post(f"{self.api}/v1/jobs", json=spec, headers=self.headers, timeout=60)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.api}/v1/jobs/{job_id}", headers=self.headers, timeout=30).json())

    def wait_for(self, condition: Callable[[], Any], what: str, timeout_s: float = 300) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"dev exited while waiting for {what}:\n{self.output()}"
            with contextlib.suppress(httpx.TransportError):  # the API going down: dev's exit says why
                if value := condition():
                    return value
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}\n{self.output()[-6000:]}")

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.wait_for(
            lambda: (job := self.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and job,
            f"job {job_id} to finish",
        )


def children_of(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines (Linux's /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        if parent == pid:
            found[int(entry.name)] = argv
    return found


def session_members(session_id: int) -> list[int]:
    """Processes still alive in the session ``dev`` leads (zombies are not alive)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[4]) == session_id:
            alive.append(int(entry.name))
    return alive


@contextlib.contextmanager
def dev_stack(tmp_path: Path, tiny_bert: Path, **settings: str) -> Iterator[DevStack]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("W2S_")},
        "W2S_STATE_DIR": str(tmp_path / "state"),
        "W2S_DATA_DIR": str(write_sst2_like(tmp_path / "data", n_train=200, n_test=60)),
        "W2S_MODEL_ROOTS": json.dumps([str(tiny_bert.parent)]),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "w2s_service.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines = TimedLines(process)
    try:
        deadline = time.monotonic() + 180
        while not _ready(port):
            assert process.poll() is None, "\n".join(line for _, line in lines.lines)
            assert time.monotonic() < deadline, "the stack did not come up"
            time.sleep(0.5)
        key = next(line.rsplit(": ", 1)[1] for _, line in lines.lines if "API key (shown once)" in line)
        headers = {"Authorization": f"Bearer {key}"}
        yield DevStack(process, lines, f"http://127.0.0.1:{port}", headers, tmp_path / "state", tiny_bert)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_message_file_caught_mid_write_leaves_the_dev_worker_running(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """The issue's crash, on the live stack: an empty message file in the cpu queue, as kombu's
    writer leaves one between creating and writing it, made the worker stop ("Unrecoverable error:
    JSONDecodeError") and `dev` every other process with it."""
    with dev_stack(tmp_path, tiny_bert) as stack:
        worker = stack.child("worker --queue cpu")
        queue = stack.state_dir / "broker" / "queue"
        (queue / f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.cpu.msg").touch()  # listed first
        job = stack.finished(stack.submit(seeds=2))
        assert job["status"] == "succeeded", stack.output()[-6000:]
        assert stack.child("worker --queue cpu") == worker, stack.output()[-6000:]
        assert "exited with" not in stack.output()


@pytest.mark.slow
def test_dev_restarts_a_killed_worker_and_its_job_still_finishes(tmp_path: Path, tiny_bert: Path) -> None:
    """kill -9 of dev's cpu worker mid-job: dev says so and starts another, the stage the dead one
    held is requeued (its heartbeat stops) and the job succeeds; SIGTERM then stops every process."""
    fast_requeue = {"W2S_HEARTBEAT_INTERVAL_S": "1", "W2S_HEARTBEAT_TIMEOUT_S": "5"}
    with dev_stack(tmp_path, tiny_bert, **fast_requeue) as stack:
        job_id = stack.submit(seeds=3)
        stack.wait_for(
            lambda: any(stage["status"] == "running" for stage in stack.job(job_id)["stages"]),
            "a stage to run",
        )
        killed = stack.child("worker --queue cpu")
        os.kill(killed, signal.SIGKILL)
        job = stack.finished(job_id)
        assert job["status"] == "succeeded", stack.output()[-6000:]
        said = stack.output()
        assert re.search(
            rf"worker --queue cpu \(pid {killed}\) exited with code -9 \(SIGKILL\); "
            r"restarting it in [\d.]+ s \(restart 1\)",
            said,
        ), said[-6000:]
        assert re.search(r"worker --queue cpu restarted \(pid \d+, restart 1\)", said), said[-6000:]
        assert stack.child("worker --queue cpu") != killed
        # SIGTERM to dev alone (not its process group): it stops every process it started.
        children = list(children_of(stack.process.pid))
        stack.process.send_signal(signal.SIGTERM)
        assert stack.process.wait(timeout=60) == 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert session_members(stack.process.pid) == [], stack.output()[-3000:]  # their pools too
