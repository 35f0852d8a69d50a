"""Shared by the service tests: where the test Postgres is and how to point Alembic at a database."""

from __future__ import annotations

import os
from pathlib import Path

from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("W2S_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    return config
