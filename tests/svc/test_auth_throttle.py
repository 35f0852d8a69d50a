"""Failed authentication is throttled (issue 18): made-up API keys from one address, or aimed at one
key's prefix from many, get 429 with Retry-After once past the limit, before the key is even looked
up; dashboard sign-ins back off, doubling; a burst is counted in the metrics and written to the
audit log. Before, 1,500 made-up keys in 9 s all got 401 and 300 wrong sign-ins took 1.8 s.

A correct key is never throttled by others' failures (issue 28, item 10): 30 made-up keys from one
address made every valid key from it wait (429), dashboard sign-in too, so one tenant behind a shared
NAT or proxy locked everyone out. Behind a proxy, ``w2s-service api --forwarded-allow-ips`` gives
each client its own address."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN_KEY
from fastapi.testclient import TestClient
from sqlalchemy import event

from svc_support import csrf_of, live_api_server

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
        # A correct key from the same address is served (a shared NAT: the guesser's neighbours), and
        # so is the admin's; the same team from elsewhere, and requests with no key, are untouched.
        assert guesser.get("/v1/jobs", headers=team.headers).status_code == 200
        assert guesser.get("/v1/admin/audit", headers=ADMIN).status_code == 200
        assert guesser.get("/v1/jobs", headers=made_up()).status_code == 429
        assert other.get("/v1/jobs", headers=team.headers).status_code == 200
        assert other.get("/v1/jobs").status_code == 401
        # Counted, and the burst audited once.
        metrics = other.get("/metrics", headers=ADMIN).text
        assert 'w2s_auth_failures_total{kind="api_key"}' in metrics
        assert 'w2s_auth_throttled_total{scope="api-address"}' in metrics
        audit = other.get("/v1/admin/audit", headers=ADMIN).json()
        bursts = [entry for entry in audit if entry["action"] == "api_key_failures_throttled"]
        assert [entry["target"] for entry in bursts] == ["203.0.113.7"]


def test_guesses_at_one_key_prefix_from_many_addresses_are_throttled(app: Any, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    target_prefix = team.key[:12]  # what a listing of keys shows, and a guesser aims at
    codes = []
    for index in range(35):  # one guess per address: the address limit never trips
        guesser = client_at(app, f"192.0.2.{index}")  # not started: 35 start-ups would take seconds
        codes.append(guesser.get("/v1/jobs", headers=made_up(target_prefix)).status_code)
    assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}
    with client_at(app, "192.0.2.200") as someone:
        assert someone.get("/v1/jobs", headers=made_up("w2s_other")).status_code == 401
        assert someone.get("/v1/jobs", headers=team.headers).status_code == 200  # the key itself works


def test_throttled_guesses_cost_no_key_lookup(app: Any, make_team) -> None:  # type: ignore[no-untyped-def]
    """The throttle still shields the database: once an address is throttled, a made-up key is
    refused from a snapshot of the keys (read at most once every few seconds), not by a query each."""
    from service.db import get_engine

    team = make_team()
    key_queries: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "api_keys" in statement:
            key_queries.append(statement)

    with client_at(app, "203.0.113.9") as guesser:
        assert {guesser.get("/v1/jobs", headers=made_up()).status_code for _ in range(30)} == {401}
        event.listen(get_engine(), "before_cursor_execute", count)
        try:
            codes = {guesser.get("/v1/jobs", headers=made_up()).status_code for _ in range(100)}
            assert codes == {429}
            assert len(key_queries) <= 1, key_queries  # the snapshot, not one lookup per guess
            assert guesser.get("/v1/jobs", headers=team.headers).status_code == 200
        finally:
            event.remove(get_engine(), "before_cursor_execute", count)


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
        # The right key signs in at once, waiting for nobody's failures (the address may be a NAT's).
        assert sign_in(browser, "w2s_wrong").status_code == 429
        assert sign_in(browser, team.key).status_code == 303


# ---- the live service, behind a proxy as docs/deployment.md sets it up --------------------------------

PROXY = "127.0.0.1"  # the trusted reverse proxy: --forwarded-allow-ips names it
STRANGER = "127.0.0.2"  # a host that is not a proxy, calling the API directly


@pytest.fixture
def behind_proxy(service_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``w2s-service api --forwarded-allow-ips <the proxy>``, as the deployment guide runs it."""
    command = [sys.executable, "-m", "w2s_service.cli", "api", "--forwarded-allow-ips", PROXY]
    with live_api_server(service_env, tmp_path / "api.log", command=command) as url:
        yield url


def from_host(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def forwarded_for(client: str, key: str | None = None) -> dict[str, str]:
    """Headers the proxy adds for ``client``, with the client's key if any."""
    return {"X-Forwarded-For": client} | ({"Authorization": f"Bearer {key}"} if key else {})


def test_one_tenants_guesses_lock_out_nobody_behind_a_proxy(behind_proxy: str, make_team) -> None:  # type: ignore[no-untyped-def]
    url, team, guesser = behind_proxy, make_team(), "203.0.113.7"
    with from_host(PROXY) as proxy:
        codes = [
            proxy.get(f"{url}/v1/jobs", headers=forwarded_for(guesser, made_up_key())).status_code
            for _ in range(35)
        ]
        assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}
        # A correct key from the guesser's own address (a neighbour behind its NAT) is served.
        assert proxy.get(f"{url}/v1/jobs", headers=forwarded_for(guesser, team.key)).status_code == 200
        # Another client of the proxy has an address of its own: its wrong key is a plain 401.
        assert (
            proxy.get(f"{url}/v1/jobs", headers=forwarded_for("198.51.100.1", made_up_key())).status_code
            == 401
        )

        # The dashboard: wrong sign-ins from the address make it wait, the right key signs in at once.
        def sign_in_via_proxy(key: str) -> httpx.Response:
            page = proxy.get(f"{url}/login", headers=forwarded_for(guesser))
            form = {"api_key": key, "csrf": csrf_of(page.text), "next": "/"}
            return proxy.post(f"{url}/login", data=form, headers=forwarded_for(guesser))

        assert [sign_in_via_proxy("w2s_wrong").status_code for _ in range(6)] == [401] * 5 + [429]
        assert sign_in_via_proxy(team.key).status_code == 303

    # A host that is not the proxy cannot choose its address: its X-Forwarded-For is ignored, so
    # thirty guesses each "from" a different address all count against the host itself.
    with from_host(STRANGER) as stranger:
        spoofed = [f"198.51.100.{index}" for index in range(31)]
        codes = [
            stranger.get(f"{url}/v1/jobs", headers=forwarded_for(ip, made_up_key())).status_code
            for ip in spoofed
        ]
        assert codes[:30] == [401] * 30 and codes[30] == 429
        assert (
            stranger.get(f"{url}/v1/jobs", headers=forwarded_for("198.51.100.99", team.key)).status_code
            == 200
        )
    with from_host(PROXY) as proxy:
        audit = proxy.get(f"{url}/v1/admin/audit", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    targets = {entry["target"] for entry in audit if entry["action"] == "api_key_failures_throttled"}
    assert targets == {guesser, STRANGER}


def made_up_key() -> str:
    return made_up()["Authorization"].removeprefix("Bearer ")
