"""The dashboard: server-rendered pages (Jinja2) for a team's jobs, sweeps and usage, served by the
API process. Signing in pastes an API key once; the page then uses a signed session cookie that
only the dashboard's own routes read, so the /v1 API stays bearer-only."""

from __future__ import annotations

from api.web.routes import STATIC_DIR, router

__all__ = ["STATIC_DIR", "router"]
