"""The Grafana dashboard (deploy/grafana/w2s-service.json) plots only metrics the service exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "w2s-service.json"


def exposed_names() -> set[str]:
    import api.deps
    import api.main  # noqa: F401
    import service.telemetry  # noqa: F401

    text = generate_latest().decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    return (
        names
        | {f"{name}{suffix}" for name in names for suffix in ("_bucket", "_count", "_sum", "_total")}
        | {
            "w2s_jobs",
            "w2s_stages",  # read from the database at scrape (service.telemetry.DatabaseCounts)
        }
    )


def test_every_panel_queries_metrics_the_service_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and dashboard["uid"] == "w2s-service"
    exposed = exposed_names()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"\bw2s_[a-z0-9_]+", target["expr"]))
            assert used and used <= exposed, (panel["title"], used - exposed)
