"""The README's examples, extracted from the README itself, run as written: the job spec validates
offline, and the shell blocks run in order against a live embedded stack (`w2s-service dev`).

Blocks are marked in the README with ``<!-- readme-test: NAME -->`` just above their code fence.
Only ``w2s run`` (the whole main job, minutes long) is left out; its figures are in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import shared_data_dir

pytestmark = pytest.mark.slow  # a live stack of processes and real models

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- readme-test: (?P<name>[\w-]+) -->\s*```(?P<lang>\w+)\n(?P<body>.*?)```", re.DOTALL)


def readme_blocks() -> dict[str, str]:
    return {m["name"]: m["body"] for m in MARKED.finditer((ROOT / "README.md").read_text())}


def needs_offline_models_and_data() -> Path:
    data_dir = shared_data_dir()
    models = [
        ROOT / "models" / name / "model.safetensors" for name in ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
    ]
    if data_dir is None or not all(path.is_file() for path in models):
        pytest.skip("needs ../shared/data and `w2s models prepare-offline models` (MiniLM-L6 and MPNet)")
    return data_dir


def test_the_readme_marks_every_example_block() -> None:
    assert {"cli", "spec", "service", "api", "client"} <= set(readme_blocks())


def test_the_spec_example_validates_offline() -> None:
    needs_offline_models_and_data()
    from w2s.spec import parse_spec

    cwd = os.getcwd()
    os.chdir(ROOT)  # the example names ./models/...
    try:
        spec = parse_spec(json.loads(readme_blocks()["spec"]))
    finally:
        os.chdir(cwd)
    assert spec.strong.model.endswith("all-mpnet-base-v2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_shell_examples_run_as_written(tmp_path: Path) -> None:
    data_dir = needs_offline_models_and_data()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("W2S_")},
        "W2S_STATE_DIR": str(tmp_path / "state"),
        "W2S_DATA_DIR": str(data_dir),
        "W2S_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115  (the child writes it)
    dev = subprocess.Popen(
        [sys.executable, "-m", "w2s_service.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _ready(port):
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (
                "the stack did not come up\n" + (tmp_path / "dev.log").read_text()
            )
            time.sleep(0.5)
        blocks = readme_blocks()
        cli = "\n".join(line for line in blocks["cli"].splitlines() if not line.startswith("w2s run"))
        script = "\n".join(["set -euo pipefail", cli, blocks["service"], blocks["api"], blocks["client"]])
        done = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
        (ROOT / "runs" / "sweep.png").unlink(missing_ok=True)


def _ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False
