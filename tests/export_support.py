"""A realistic finished job for the tracker exports: the spec, results, stages, curves and figures the
service hands to w2s.tracking.build_export.

Two seeds of weak, ceiling and two students (xent and logconf with a parameter), curves of 50 steps,
and one reused stage (seed 1's weak model, whose result an earlier job computed). The results document
is w2s.results' own, built from made-up test probabilities. ``reused=False`` gives the earlier job
that computed the reused stage.

:func:`mlflow_server` starts a real MLflow tracking server (scripts/install.sh installs it);
:func:`silent_server` is one that accepts connections and never answers, :func:`recording_server`
one that records what it was sent; :func:`read_run` reads a W&B offline run back from its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2s.results import SeedPredictions, build_results
from w2s.spec import parse_spec

STEPS = 50
SEEDS = (0, 1)
LOSSES = ("xent", "logconf(aux_coef=0.5)")
KINDS = ("weak", "ceiling", *(f"student:{loss}" for loss in LOSSES))
REUSED = ("weak", 1)  # (kind, seed) of the stage whose result came from another job
REUSED_KEY = "k" * 63 + "1"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def job_spec() -> dict[str, Any]:
    return parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 120, "n_test": 40},
            "weak": {"model": "gpt2", "lr": 1e-3},
            "strong": {"model": "gpt2-medium", "mode": "lora"},
            "transfer": {"epochs": 1},
            "losses": ["xent", {"name": "logconf", "aux_coef": 0.5}],
            "seeds": list(SEEDS),
        }
    ).model_dump(mode="json")


def job_results() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(float)

    def probs(skill: float) -> np.ndarray:
        right = rng.random(200) < skill
        return np.where(right == (labels > 0.5), 0.8, 0.2) + rng.normal(0, 0.05, 200)

    predictions = [
        SeedPredictions(
            seed=seed,
            weak=probs(0.7),
            ceiling=probs(0.9),
            students={loss: probs(0.8 + 0.02 * i) for i, loss in enumerate(LOSSES)},
        )
        for seed in SEEDS
    ]
    results = build_results(predictions, labels, timings={"weak": 1.5, "ceiling": 4.0, "total": 9.0})
    results["data"] = {"sampling": "random", "resample_per_seed": True, "remove_overlap": True}
    return results


def stage_id(kind: str, seed: int) -> str:
    return f"st-{seed}-{kind.replace(':', '-').replace('(', '-').replace(')', '').replace('=', '-')}"


def stage_key(kind: str, seed: int) -> str:
    return REUSED_KEY if (kind, seed) == REUSED else hashlib.sha256(f"{kind} {seed}".encode()).hexdigest()


def job_stages(reused_stage: bool = True) -> list[dict[str, Any]]:
    stages = []
    for seed in SEEDS:
        for index, kind in enumerate(KINDS):
            reused = reused_stage and (kind, seed) == REUSED
            stages.append(
                {
                    "id": stage_id(kind, seed),
                    "kind": kind,
                    "seed": seed,
                    "status": "cached" if reused else "succeeded",
                    "key": stage_key(kind, seed),
                    "reused": reused,
                    "metrics": {"accuracy": 0.7 + 0.05 * index + 0.01 * seed, "auroc": 0.75 + 0.04 * index},
                    "started_at": f"2026-01-0{seed + 1}T10:0{index}:00+00:00",
                    "finished_at": f"2026-01-0{seed + 1}T10:0{index}:30+00:00",
                }
            )
    return stages


def loss_value(kind: str, seed: int, step: int) -> float:
    return 0.7 * math.exp(-step / 20) + 0.01 * KINDS.index(kind) + 0.001 * seed


def job_series(reused_stage: bool = True) -> list[dict[str, Any]]:
    """Each stage's loss, train accuracy and lr every step, and an evaluation every 10 steps; the
    reused stage's curves come from the run that computed it, as the service serves them."""
    series = []
    for seed in SEEDS:
        for kind in KINDS:
            steps = list(range(1, STEPS + 1))
            curves = {
                "loss": [loss_value(kind, seed, step) for step in steps],
                "train_accuracy": [min(1.0, 0.5 + step / 100) for step in steps],
                "lr": [1e-3 * (1 - step / STEPS) for step in steps],
            }
            for name, values in curves.items():
                series.append(
                    {
                        "stage_id": stage_id(kind, seed),
                        "kind": kind,
                        "seed": seed,
                        "name": name,
                        "steps": steps,
                        "values": values,
                        "reused": reused_stage and (kind, seed) == REUSED,
                    }
                )
            evaluations = list(range(10, STEPS + 1, 10))
            series.append(
                {
                    "stage_id": stage_id(kind, seed),
                    "kind": kind,
                    "seed": seed,
                    "name": "eval_accuracy",
                    "steps": evaluations,
                    "values": [0.6 + step / 200 for step in evaluations],
                    "reused": reused_stage and (kind, seed) == REUSED,
                }
            )
    return series


def job_figures() -> dict[str, bytes]:
    return {
        "curves_loss.svg": SVG,
        "curves_accuracy.svg": SVG,
        "manifest.json": b'{"spec": {}, "seeds": [0, 1]}',
    }


def build_job(job_id: str | None, *, reused_stage: bool = True, name: str = "probe job") -> Any:
    from w2s.tracking import build_export

    return build_export(
        job_spec(),
        job_results(),
        job_stages(reused_stage),
        job_series(reused_stage),
        job_figures(),
        name=name,
        group=None,
        job_id=job_id,
    )


def write_tiny_spec(path: Path, weak: Path, strong: Path) -> Path:
    """A ``w2s run`` spec of two tiny random models (tests/helpers.py) that trains in seconds."""
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec = {
        "dataset": {"name": "sst2", "n_train": 80, "n_test": 30},
        "weak": {"model": str(weak), **options},
        "strong": {"model": str(strong), **options},
        "losses": ["xent"],
    }
    path.write_text(json.dumps(spec))
    return path


# -- a real MLflow server ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_SERVER = ROOT / ".venv" / "mlflow-server" / "bin" / "mlflow"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout_s: float = 120.0, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` with a SQLite store and proxied artifacts under ``folder``; yields its URI.

    The full mlflow package lives in a virtualenv of its own (W2S_TEST_MLFLOW_SERVER, else
    .venv/mlflow-server, made by scripts/install.sh). Its GenAI job runner (a dozen huey workers) is
    off: exports do not use it, and two shared cores are better spent elsewhere."""
    import pytest

    executable = Path(os.environ.get("W2S_TEST_MLFLOW_SERVER") or MLFLOW_SERVER)
    if not executable.is_file():
        pytest.fail(
            f"no MLflow server at {executable}: run bash scripts/install.sh (it makes .venv/mlflow-server)"
        )
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    command = [
        str(executable), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as output:
        # A session of its own: teardown ends the server and every process it started, by group id.
        server = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever of the group is left (uvicorn's worker)
        server.wait(timeout=15)


class SilentServer:
    """A tracking server whose host accepts every connection, reads what is sent and never answers
    (a hung process behind a live port). It counts the connections open now, the most open at once,
    and all it accepted; closing it resets every connection, so whoever waits on one fails at once."""

    def __init__(self) -> None:
        import selectors
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.listener.setblocking(False)
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open = self.most = self.accepted = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import selectors

        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                if sock is self.listener:
                    with contextlib.suppress(BlockingIOError):
                        connection, _ = self.listener.accept()
                        connection.setblocking(False)
                        self._selector.register(connection, selectors.EVENT_READ)
                        self.accepted += 1
                        self.open += 1
                        self.most = max(self.most, self.open)
                    continue
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # the client gave up on it
                    self._selector.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    self.open -= 1
        for key in list(self._selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # type: ignore[union-attr]
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    """A :class:`SilentServer` for the block; every connection is reset when it ends."""
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server that records each request's headers and answers every one with 503; yields
    its URI and the list of recorded header dicts (what a tracking server would have been sent)."""
    import http.server
    import threading

    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append({name.lower(): value for name, value in self.headers.items()})
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="recording-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


# The run file (run-<id>.wandb): a 7-byte header, then LevelDB-log framing of protobuf Records in
# 32 KiB blocks, each chunk behind a 7-byte header (CRC-32C, length, type: full, first, middle, last).
# wandb 0.31 has no Python reader of its own any more (wandb-core, in Go, writes and syncs it).
HEADER = b":W&B"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)
    exit_code: int | None = None


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == HEADER, f"{path} is not a W&B run file"
    position, pending, found = 7, b"", []
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding up to the block's end
            position += BLOCK - position % BLOCK
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def _value(item: Any) -> tuple[str, Any]:
    return ".".join([item.key] if item.key else list(item.nested_key)), json.loads(item.value_json)


def read_run(folder: Path) -> OfflineRun:
    """One offline run as W&B will show it once synced."""
    (path,) = folder.glob("run-*.wandb")
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run = record.run
            run.config.update(_value(item) for item in record.run.config.update)
        elif kind == "config":
            run.config.update(_value(item) for item in record.config.update)
        elif kind == "history":
            run.history.append(dict(_value(item) for item in record.history.item))
        elif kind == "summary":
            run.summary.update(_value(item) for item in record.summary.update)
        elif kind == "files":
            run.files.update(item.path for item in record.files.files)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
