"""Service fixtures: a fresh Postgres database per test session (migrated with Alembic), settings
pointing at it, table truncation between tests, an API client and team factories."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.auth import create_api_key, create_team
from service.db import get_engine, reset_caches, session_scope
from service.models import Base
from svc_support import PG_ADMIN_URL, REDIS_DB, Stack, alembic_config, live_api_server

ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"w2s_test_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.skip(f"Postgres is not reachable at W2S_TEST_PG_ADMIN={PG_ADMIN_URL}: {error}".strip())
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    command.upgrade(alembic_config(url), "head")
    yield url
    reset_caches()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fake_hub_cache(home: Path, models: list[str]) -> Path:
    """A Hugging Face cache holding just the config of each model: enough for the service to know
    the model would load offline (tests never download)."""
    for model in models:
        repo = home / "hub" / f"models--{model.replace('/', '--')}"
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return home


@pytest.fixture
def service_env(
    pg_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Settings for one test: the session's Postgres, a private state dir, store and data dir; models
    may live anywhere under pytest's temporary directory (where the tiny models are built)."""
    from helpers import write_sst2_like

    data_dir = write_sst2_like(tmp_path / "data")
    hf_home = fake_hub_cache(tmp_path / "hf", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"])
    env = {
        "HF_HOME": str(hf_home),  # the hub ids tests name are "cached"; the hub itself is off
        "W2S_DATABASE_URL": pg_url,
        "W2S_STATE_DIR": str(tmp_path / "state"),
        "W2S_ARTIFACT_STORE": str(tmp_path / "store"),
        "W2S_DATA_DIR": str(data_dir),
        "W2S_ADMIN_KEY": ADMIN_KEY,
        "W2S_SESSION_SECRET": "test-session-secret",
        "W2S_MODEL_ROOTS": json.dumps([str(tmp_path_factory.getbasetemp())]),
        "W2S_PROGRESS_FLUSH_S": "0.2",
        "W2S_DISPATCH_INTERVAL_S": "0.2",
        "HF_HUB_OFFLINE": "1",  # planning pins hub models to a revision only when online
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    yield env
    with get_engine().begin() as connection:
        tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))
    reset_caches()


@pytest.fixture
def client(service_env: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@dataclass
class TeamKey:
    team_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_team(service_env: dict[str, str]):  # type: ignore[no-untyped-def]
    def factory(name: str | None = None, **options: object) -> TeamKey:
        with session_scope() as session:
            team = create_team(session, name=name or f"team-{uuid.uuid4().hex[:6]}", **options)  # type: ignore[arg-type]
            _, key = create_api_key(session, team=team)
            return TeamKey(team.id, key)

    return factory


def redis_reachable() -> bool:
    try:
        return bool(redis.Redis(db=REDIS_DB, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def stack(service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379 (the real workers' broker)")
    # A key prefix of its own, so concurrent test runs sharing this Redis never take each other's tasks.
    prefix = f"w2s-test-{uuid.uuid4().hex[:8]}:"
    env = {
        **service_env,
        "W2S_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "W2S_BROKER_KEY_PREFIX": prefix,
        "W2S_QUEUE_SLOTS": '{"cpu": 1}',
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    (tmp_path / "logs").mkdir()
    running = Stack(env, tmp_path / "logs")
    running.start("worker", "--queue", "cpu")
    running.start("worker", "--queue", "control")
    running.start("dispatcher")
    yield running
    running.stop()
    client = redis.Redis(db=REDIS_DB)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.fixture
def live_api(service_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A real uvicorn on the test's Postgres: concurrency as clients meet it."""
    with live_api_server(service_env, tmp_path / "api.log") as url:
        yield url
