"""scripts/run-example.sh --serve: the command the script prints after it stops the service, so the
dashboard link it printed answers again (issue 29, item 5). A tiny job run through the same command
makes the state; the command started again on that state serves the job's page with its results."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlencode

import pytest

from helpers import write_sst2_like

pytestmark = pytest.mark.slow  # the service's processes, twice

ROOT = Path(__file__).resolve().parents[1]
KEY_LINE = re.compile(r"API key \(shown once[^)]*\): (\S+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[str]:
    """`bash scripts/run-example.sh --serve` until the block ends; yields what it printed by the time
    the API answered."""
    port = env["W2S_PORT"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", "scripts/run-example.sh", "--serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            while not _answers(f"http://127.0.0.1:{port}/readyz"):
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the service did not answer\n" + log.read_text()[-3000:]
                time.sleep(0.5)
            yield log.read_text()
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # as Ctrl-C: dev stops every process it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _call(method: str, url: str, key: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def test_serve_brings_back_the_dashboard_on_the_same_state(tmp_path: Path, tiny_bert: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "w2s-service").is_file():
        pytest.skip("--serve runs the checkout's .venv: bash scripts/install.sh makes it")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("W2S_")},
        "W2S_STATE_DIR": str(tmp_path / "state"),
        "W2S_DATA_DIR": str(write_sst2_like(tmp_path / "data", n_train=400, n_test=100)),
        "W2S_MODEL_ROOTS": json.dumps([str(tiny_bert.parent)]),
        "W2S_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    api = f"http://127.0.0.1:{port}"
    options = {"mode": "probe", "max_length": 32, "epochs": 5}
    spec = {
        "dataset": {"name": "sst2", "n_train": 400, "n_test": 100},
        "weak": {"model": str(tiny_bert), **options},
        "strong": {"model": str(tiny_bert), **options},
        "losses": ["xent"],
        "seeds": [0],
    }

    # The state: a first start makes the team and its key; a tiny job runs to its results.
    with serving(env, tmp_path / "first.log") as said:
        match = KEY_LINE.search(said)
        assert match, said
        key = match.group(1)
        job_id = _call("POST", f"{api}/v1/jobs", key, spec)["id"]
        deadline = time.monotonic() + 300
        while (job := _call("GET", f"{api}/v1/jobs/{job_id}", key))["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, f"the tiny job did not finish: {job['status']}"
            time.sleep(1)
        assert job["status"] == "succeeded", job["error"]
    assert not _answers(f"{api}/readyz"), "the service still answers after it was stopped"

    # The same command again: the job's page, signed in with the key made before, shows its results.
    with serving(env, tmp_path / "second.log"):
        cookies = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        with cookies.open(f"{api}/login", timeout=30) as answer:
            csrf = re.search(r'name="csrf" value="([^"]+)"', answer.read().decode())
        assert csrf, "no CSRF field on the login page"
        form = urlencode({"api_key": key, "csrf": csrf.group(1), "next": f"/jobs/{job_id}"}).encode()
        with cookies.open(f"{api}/login", data=form, timeout=30) as answer:  # follows the redirect
            page = answer.read().decode()
            assert answer.url.endswith(f"/jobs/{job_id}"), answer.url
    weak_accuracy = f"{job['results']['weak']['accuracy']:.3f}"
    assert "results-table" in page and "student · xent" in page, page[-3000:]
    assert weak_accuracy in page, f"the weak accuracy {weak_accuracy} is not on the job's page"


def test_the_script_refuses_an_unknown_argument() -> None:
    done = subprocess.run(
        ["bash", "scripts/run-example.sh", "--serv"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "unknown argument '--serv'" in done.stderr and "--serve" in done.stderr
