"""Failed authentication is throttled (issue 18): made-up API keys from one address, or aimed at one
key's prefix from many, get 429 with Retry-After once past the limit, before the key is even looked
up; dashboard sign-ins back off, doubling; a burst is counted in the metrics and written to the
audit log. Before, 1,500 made-up keys in 9 s all got 401 and 300 wrong sign-ins took 1.8 s."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from conftest import ADMIN_KEY
from fastapi.testclient import TestClient

from svc_support import csrf_of

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def made_up(prefix: str = "w2s_") -> dict[str, str]:
    return {"Authorization": f"Bearer {prefix}{secrets.token_urlsafe(24)}"}


@pytest.fixture
def app(service_env: dict[str, str]) -> Any:
    from api.main import create_app

    return create_app()


def client_at(app: Any, address: str) -> TestClient:
    """A client of ``app`` (one API process: its counts are shared) calling from ``address``."""
    return TestClient(app, client=(address, 40000))


def test_made_up_keys_from_one_address_get_429_past_the_limit(app: Any, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    with client_at(app, "203.0.113.7") as guesser, client_at(app, "198.51.100.1") as other:
        codes = [guesser.get("/v1/jobs", headers=made_up()).status_code for _ in range(40)]
        assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}  # W2S_AUTH_FAILURES_PER_MINUTE = 30
        refused = guesser.get("/v1/jobs", headers=made_up())
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["limit"] == "auth_failures" and "address" in refused.json()["detail"]
        # The address waits, whatever it sends (a guess that happens to be right learns nothing); the
        # same team from elsewhere, and requests with no key at all, are untouched.
        assert guesser.get("/v1/jobs", headers=team.headers).status_code == 429
        assert other.get("/v1/jobs", headers=team.headers).status_code == 200
        assert other.get("/v1/jobs").status_code == 401
        # Counted, and the burst audited once.
        metrics = other.get("/metrics", headers=ADMIN).text
        assert 'w2s_auth_failures_total{kind="api_key"}' in metrics
        assert 'w2s_auth_throttled_total{scope="api-address"}' in metrics
        audit = other.get("/v1/admin/audit", headers=ADMIN).json()
        bursts = [entry for entry in audit if entry["action"] == "api_key_failures_throttled"]
        assert [entry["target"] for entry in bursts] == ["203.0.113.7"]


def test_guesses_at_one_key_prefix_from_many_addresses_are_throttled(app: Any) -> None:
    target_prefix = "w2s_TARGET12"[:12]
    codes = []
    for index in range(35):  # one guess per address: the address limit never trips
        with client_at(app, f"192.0.2.{index}") as guesser:
            codes.append(guesser.get("/v1/jobs", headers=made_up(target_prefix)).status_code)
    assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}
    with client_at(app, "192.0.2.200") as someone:
        assert someone.get("/v1/jobs", headers=made_up("w2s_other")).status_code == 401


def sign_in(client: TestClient, key: str) -> Any:
    page = client.get("/login")
    return client.post(
        "/login", data={"api_key": key, "csrf": csrf_of(page.text), "next": "/"}, follow_redirects=False
    )


def test_wrong_dashboard_sign_ins_back_off_doubling(app: Any, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    with client_at(app, "203.0.113.50") as browser:
        assert [sign_in(browser, "w2s_wrong").status_code for _ in range(5)] == [401] * 5  # free
        refused = sign_in(browser, "w2s_wrong")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "wait 1 s" in refused.text
        time.sleep(1.1)
        assert sign_in(browser, "w2s_wrong").status_code == 401  # allowed again, and wrong again
        assert sign_in(browser, "w2s_wrong").headers["retry-after"] == "2"  # the wait doubled
        time.sleep(2.1)
        assert sign_in(browser, team.key).status_code == 303  # the right key, after waiting
