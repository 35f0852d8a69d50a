"""The library installs and runs without the service: `pip install .` gives w2s and `w2s run`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE_ONLY = (
    "fastapi",
    "starlette",
    "uvicorn",
    "celery",
    "kombu",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "httpx",
    "redis",
    "prometheus_client",
    "jinja2",
    "itsdangerous",
    "tenacity",
    "cachetools",
    "matplotlib",
)

PROGRAM = f"""
import sys
for name in {SERVICE_ONLY!r}:
    sys.modules[name] = None  # importing it now fails, as if it were not installed
import w2s.pipeline, w2s.cli, w2s.splits, w2s.stages
from w2s_service import user_cli
sys.exit(user_cli.main(["losses"]))
"""


def test_the_library_and_w2s_run_import_nothing_of_the_service() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logconf" in done.stdout
