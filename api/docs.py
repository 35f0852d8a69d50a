"""The API's interactive documentation, ``/docs``: Swagger UI served from this origin, never from a
CDN (issue 28: FastAPI's page loaded it from one, without integrity checks, on the dashboard's
origin, where a script from elsewhere could read a signed-in team's pages).

Swagger UI's files come from the ``fastapi-offline`` package (pinned in docker/constraints.txt;
1.7.7 ships Swagger UI 5.32.6, Apache-2.0, and its own code is MIT). The page allows scripts and
styles from this origin only: its set-up is a file (api/web/static/api-docs.js), not an inline
script. ReDoc (FastAPI's ``/redoc``) is off: one documentation page is enough to keep safe.
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

# Swagger UI's JavaScript and CSS, as the package installs them.
SWAGGER_UI_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS_URL = "/docs/assets"

# Swagger UI sets element styles from its script (allowed: the CSP governs style elements and
# attributes, which it does not need) and draws its icons as data: images.
DOCS_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def docs_page(title: str, openapi_url: str, root_path: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<link rel="icon" href="{root_path}/static/favicon.svg">
<link rel="stylesheet" href="{root_path}{ASSETS_URL}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{html.escape(root_path + openapi_url)}"></div>
<script src="{root_path}{ASSETS_URL}/swagger-ui-bundle.js"></script>
<script src="{root_path}/static/api-docs.js"></script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """``/docs`` and its files on ``app``, which must be built with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's own pages load Swagger UI and ReDoc from a CDN)."""
    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(ASSETS_URL, StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        page = docs_page(f"{app.title} API", openapi_url, request.scope.get("root_path", ""))
        return HTMLResponse(page, headers=DOCS_SECURITY_HEADERS)
