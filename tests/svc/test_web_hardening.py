"""The dashboard's origin loads nothing from elsewhere and its cookie gives nothing away (issue 28,
item 12): ``/docs`` loaded Swagger UI from a CDN without integrity checks on the dashboard's origin,
and the session cookie, signed but readable, showed the API key's first 10 characters in base64."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner

from svc_support import csrf_of

CHROMIUM = Path("/usr/bin/chromium")


def cookie_payload(cookie: str) -> dict[str, Any]:
    """What anyone holding the cookie reads: Starlette signs its base64 JSON, it does not encrypt it."""
    payload = cookie.split(".")[0]
    return json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def sign_in(client: httpx.Client, key: str) -> httpx.Response:
    form = {"api_key": key, "csrf": csrf_of(client.get("/login").text), "next": "/"}
    return client.post("/login", data=form)


def test_the_session_cookie_holds_no_part_of_the_key(live_api: str, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    with httpx.Client(base_url=live_api, timeout=30) as browser:
        assert sign_in(browser, team.key).status_code == 303
        cookie = browser.cookies["w2s_session"]
        decoded = json.dumps(cookie_payload(cookie))
        pieces = {team.key[start : start + 6] for start in range(len(team.key) - 5)}
        assert not [piece for piece in pieces if piece in cookie or piece in decoded], decoded
        assert set(cookie_payload(cookie)) == {"session_id", "csrf"}  # random tokens only
        # The page still says which key signed in: the server looks its listed prefix up.
        assert f"{team.key[:10]}…" in browser.get("/team").text


def test_a_cookie_from_before_loses_its_key_prefix(live_api: str, make_team, service_env) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    with httpx.Client(base_url=live_api, timeout=30) as browser:
        assert sign_in(browser, team.key).status_code == 303
        # The cookie as sign-in wrote it before: the same session, plus the key's first characters.
        stale = {"key_prefix": team.key[:10], "team_id": team.team_id}
        old = cookie_payload(browser.cookies["w2s_session"]) | stale
        signer = TimestampSigner(service_env["W2S_SESSION_SECRET"])
        browser.cookies.clear()
        signed = signer.sign(base64.b64encode(json.dumps(old).encode())).decode()
        browser.cookies.set("w2s_session", signed, domain="127.0.0.1")
        assert browser.get("/").status_code == 200  # still signed in
        assert set(cookie_payload(browser.cookies["w2s_session"])) == {"session_id", "csrf"}


def test_api_docs_load_nothing_from_another_origin(live_api: str) -> None:
    with httpx.Client(base_url=live_api, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert not re.findall(r"(?:src|href)=\"(?:https?:)?//", page.text), page.text  # no CDN
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'self'" in policy
        assert "<script>" not in page.text  # the policy allows no inline script: there is none
        assets = re.findall(r"(?:src|href)=\"(/[^\"]+)\"", page.text)
        assert any(path.endswith("swagger-ui-bundle.js") for path in assets)
        for path in assets:
            served = client.get(path)
            assert served.status_code == 200 and served.content, path
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/redoc").status_code == 404  # ReDoc, also from a CDN, is off


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium")
def test_api_docs_work_in_a_browser_under_their_policy(live_api: str) -> None:
    """Swagger UI renders every endpoint with its scripts, styles and images from this origin only,
    and the Content-Security-Policy blocks nothing it needs (a violation is a console error)."""
    from playwright.sync_api import sync_playwright
    from test_dashboard_browser import CHROMIUM_ARGS

    requested: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{live_api}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() > 10  # the operations, drawn
        finally:
            browser.close()
    assert requested and all(url.startswith(live_api) for url in requested), requested
    assert not errors, errors
