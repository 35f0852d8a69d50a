"""Concurrent submissions with repeated Idempotency-Keys against a live uvicorn on Postgres: racing
requests for one key must converge on one job (the unique constraint decides), never a 5xx."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.models import Job

pytestmark = pytest.mark.slow  # a real uvicorn server under concurrent load

ROOT = Path(__file__).resolve().parents[2]
REQUESTS, KEYS, CLIENTS = 200, 50, 50


def test_concurrent_repeats_of_a_key_create_one_job(
    live_api: str, make_team, tiny_bert: Path, tiny_gpt2: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    body: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 64, "n_test": 32},
        "weak": {"model": str(tiny_bert)},
        "strong": {"model": str(tiny_gpt2)},
        "losses": ["xent"],
        "seeds": [0],
    }

    async def burst() -> list[tuple[int, int, str]]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=live_api, limits=limits, timeout=30) as client:

            async def submit(index: int) -> tuple[int, int, str]:
                key = f"burst-{index % KEYS}"
                headers = {**team.headers, "Idempotency-Key": key}
                response = await client.post("/v1/jobs", json=body, headers=headers)
                job_id = response.json().get("id", "") if response.status_code < 300 else response.text
                return index % KEYS, response.status_code, job_id

            return await asyncio.gather(*(submit(index) for index in range(REQUESTS)))

    started = time.monotonic()
    results = asyncio.run(burst())
    assert time.monotonic() - started < 30
    assert all(status in (200, 201) for _, status, _ in results), [r for r in results if r[1] >= 300][:3]
    ids_per_key: dict[int, set[str]] = {}
    for key, _, job_id in results:
        ids_per_key.setdefault(key, set()).add(job_id)
    assert all(len(ids) == 1 for ids in ids_per_key.values()), "one key answered with two jobs"
    assert sum(status == 201 for _, status, _ in results) == KEYS  # one creation per key
    with session_scope() as session:
        assert (
            session.scalar(select(func.count()).select_from(Job).where(Job.team_id == team.team_id)) == KEYS
        )
