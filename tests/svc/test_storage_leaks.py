"""Smaller leaks a hostile team found (issue 28, item 12): an unknown stored model's error named the
artifact store's URI (an S3 bucket in production), and uploads had a size quota but no count limit
(150 in 9 s). Attacked against the live API."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import reset_caches
from svc_support import live_api_server, tiny_job

ADMIN = {"Authorization": "Bearer test-admin-key"}


def small_upload(i: int) -> bytes:
    return b"".join(b'{"text": "upload %d row %d", "label": %d}\n' % (i, row, row % 2) for row in range(12))


def test_uploads_are_counted_against_a_limit_that_parallel_uploads_cannot_pass(
    service_env: dict[str, str], make_team, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    env = {**service_env, "W2S_MAX_UPLOADS": "3"}
    with live_api_server(env, tmp_path / "api.log") as url, httpx.Client(base_url=url, timeout=60) as api:

        def upload(i: int) -> httpx.Response:
            return api.post(
                "/v1/datasets", files={"file": (f"d{i}.jsonl", small_upload(i))}, headers=team.headers
            )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(upload, range(8)))
        assert sorted(a.status_code for a in answers) == [201] * 3 + [422] * 5
        refused = next(a for a in answers if a.status_code == 422).json()
        assert refused["limit"] == "max_uploads" and "DELETE /v1/datasets" in refused["detail"]
        # An admin raises the team's own limit; deleting one frees a place too.
        api.patch(
            f"/v1/admin/teams/{team.team_id}", json={"max_uploads": 4}, headers=ADMIN
        ).raise_for_status()
        assert upload(8).status_code == 201 and upload(9).status_code == 422
        kept = api.get("/v1/datasets", headers=team.headers).json()["data"]
        assert api.delete(f"/v1/datasets/{kept[0]['id']}", headers=team.headers).status_code == 204
        assert upload(10).status_code == 201


def test_an_unknown_stored_model_is_refused_without_naming_the_store(
    service_env: dict[str, str], s3_env: Any, make_team, tiny_bert: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_env.new_bucket()
    env = {**service_env, "W2S_ARTIFACT_STORE": bucket}
    team = make_team()
    with live_api_server(env, tmp_path / "api.log") as url:
        body = tiny_job(Path("store:" + "ab" * 32), tiny_bert)
        answer = httpx.post(f"{url}/v1/jobs", json=body, headers=team.headers, timeout=60)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "weak", "model"]
    assert "w2s-service models push" in answer.text
    name = bucket.removeprefix("s3://").split("/")[0]
    assert name not in answer.text and "s3://" not in answer.text and s3_env.endpoint_url not in answer.text


def test_a_store_that_cannot_be_reached_is_a_503_that_names_no_url(
    service_env: dict[str, str], make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    env = {
        **service_env,
        "W2S_ARTIFACT_STORE": "s3://secret-bucket-name/w2s",
        "W2S_STORE_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens there
        "W2S_STORE_RETRY_S": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    team = make_team()
    with live_api_server(env, tmp_path / "api.log") as url:
        answer = httpx.post(
            f"{url}/v1/jobs",
            json=tiny_job(Path("store:" + "ab" * 32), tiny_bert),
            headers=team.headers,
            timeout=60,
        )
    assert answer.status_code == 503, answer.text
    assert "secret-bucket-name" not in answer.text and "127.0.0.1:9" not in answer.text
    assert answer.headers["Retry-After"]
