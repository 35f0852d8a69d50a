"""Fuzz every endpoint in /openapi.json with schemathesis, in process, on a fresh Postgres database.

The ASGI app (``api.main.create_app()``) runs against a database this script creates, migrates
and drops. Two runs, every phase schemathesis has (examples, coverage, fuzzing, stateful):

- **with a key**: a real team's key (the admin key for the admin endpoints); path ids are drawn
  half the time from objects seeded beforehand (a job, a sweep, an uploaded dataset, the team), so
  reads, cancels and retries reach real rows, and half the time generated;
- **without a key**: the auth path; any 2xx from a /v1 endpoint is counted as an auth bypass.

It prints the cases run per endpoint and in total, the server errors (5xx, or an exception out of
the app: must be 0) and the other check failures by check, and exits 1 if there is a server
error or an auth bypass. ``--json PATH`` writes the same figures.

    python bench/fuzz_api.py [--max-examples 100] [--seed 0] [--json PATH]

Needs the Postgres of the service tests (``W2S_TEST_PG_ADMIN``, default
postgresql://postgres@127.0.0.1:5432/test). The ``positive_data_acceptance`` check is off: the
schema cannot say that a cursor must come from an earlier page or that a local model directory
must exist, so schema-valid requests that the service refuses with a 422 are expected.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = os.environ.get("W2S_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_KEY = "fuzz-admin-key"
# Schema-valid requests may be refused for reasons no schema states (see the module docstring).
DISABLED_CHECKS = ("positive_data_acceptance",)


@dataclass
class RunFigures:
    """What one schemathesis run found."""

    name: str
    cases: Counter[str] = field(default_factory=Counter)  # per "METHOD /path"
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # per check, server errors excluded
    failure_examples: dict[str, str] = field(default_factory=dict)  # first message per (check, endpoint)
    auth_bypasses: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": sum(self.cases.values()),
            "cases_per_endpoint": dict(sorted(self.cases.items())),
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
            "server_errors": len(self.server_errors),
            "server_error_examples": self.server_errors[:20],
            "failures": dict(sorted(self.failures.items())),
            "failure_examples": self.failure_examples,
            "auth_bypasses": self.auth_bypasses,
            "seconds": round(self.seconds, 1),
        }


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, migrated Postgres database, dropped afterwards (as tests/svc/conftest.py does)."""
    import psycopg
    from alembic import command
    from alembic.config import Config

    name = f"w2s_fuzz_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["database_url"] = url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        yield url
    finally:
        from service.db import reset_caches

        reset_caches()  # close the pool before dropping the database
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def point_service_at(database_url: str, state: Path) -> None:
    from service.db import reset_caches

    data_dir = state / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "W2S_DATABASE_URL": database_url,
            "W2S_STATE_DIR": str(state / "state"),
            "W2S_ARTIFACT_STORE": str(state / "store"),
            "W2S_DATA_DIR": str(data_dir),
            "W2S_ADMIN_KEY": ADMIN_KEY,
            "W2S_MAX_UPLOAD_MB": "1",
        }
    )
    reset_caches()


@dataclass
class Seeded:
    team_id: str
    key: str
    job_id: str
    sweep_id: str
    dataset_id: str


def seed_objects() -> Seeded:
    """A team with a key, an uploaded dataset, a job on it and a sweep, made through the service."""
    from service import sweeps, uploads
    from service.auth import create_api_key, create_team
    from service.db import session_scope
    from service.jobs import create_job, resolve_spec
    from service.settings import get_settings

    settings = get_settings()
    rows = "".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(20))
    with session_scope() as session:
        team = create_team(session, name="fuzz")
        _, key = create_api_key(session, team=team)
        dataset = uploads.create_dataset(
            session, team=team, settings=settings, source=io.BytesIO(rows.encode()), filename="d.jsonl"
        )
        raw = {
            "dataset": {"name": f"upload:{dataset.id}", "n_train": 10, "n_test": 4},
            "weak": {"model": "gpt2"},
            "strong": {"model": "gpt2-medium"},
        }
        spec = resolve_spec(session, team=team, raw=raw, settings=settings)
        job, _ = create_job(session, team=team, spec=spec, name="seeded")
        sweep = sweeps.create_sweep(
            session,
            team=team,
            settings=settings,
            grid={
                "dataset": {"name": "sst2", "n_train": 40},
                "weak_models": ["gpt2"],
                "strong_models": ["gpt2-medium"],
                "transfer": {},
                "losses": ["xent"],
                "seeds": [0],
            },
            name="seeded",
        )
        return Seeded(team.id, key, job.id, sweep.id, dataset.id)


def schemathesis_config(
    *, max_examples: int, seed: int, key: str | None, seeded: Seeded | None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "seed": seed,
        "workers": 1,
        "continue-on-failure": True,
        "cache": {"enabled": False},  # no .schemathesis/ folder in the checkout
        "generation": {"mode": "all", "max-examples": max_examples, "database": "none"},
        "checks": {name: {"enabled": False} for name in DISABLED_CHECKS},
    }
    if key is not None:
        config["headers"] = {"Authorization": f"Bearer {key}"}
        config["operations"] = [
            {
                "include-path": ["/v1/teams", "/v1/teams/{team_id}/keys"],
                "headers": {"Authorization": f"Bearer {ADMIN_KEY}"},
            }
        ]
    if seeded is not None:
        ids = {
            "job_id": seeded.job_id,
            "sweep_id": seeded.sweep_id,
            "dataset_id": seeded.dataset_id,
            "team_id": seeded.team_id,
        }
        config["dictionaries"] = {name: {"values": [value]} for name, value in ids.items()}
        config["parameters"] = {f"path.{name}": {"dictionary": name, "probability": 0.5} for name in ids}
    return config


def run(name: str, app: Any, config: dict[str, Any]) -> RunFigures:
    import schemathesis
    from schemathesis.engine import events, from_schema

    figures = RunFigures(name)
    started = time.perf_counter()
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=schemathesis.Config.from_dict(config)
    )
    seen: set[tuple[str, str]] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            record(figures, event.recorder, seen, check_auth="headers" not in config)
        elif isinstance(event, events.NonFatalError) and event.related_to_operation:
            # An exception out of the app (or out of schemathesis): a server error until shown otherwise.
            figures.server_errors.append({"endpoint": event.label, "error": repr(event.value)[:500]})
        elif isinstance(event, events.FatalError):
            raise RuntimeError(f"schemathesis stopped: {event.exception!r}") from event.exception
    figures.seconds = time.perf_counter() - started
    return figures


def record(figures: RunFigures, recorder: Any, seen: set[tuple[str, str]], *, check_auth: bool) -> None:
    for case_id, node in recorder.cases.items():
        endpoint = node.value.operation.label
        figures.cases[endpoint] += 1
        interaction = recorder.interactions.get(case_id)
        response = interaction.response if interaction is not None else None
        if response is not None:
            figures.statuses[response.status_code] += 1
            if response.status_code >= 500:
                body = response.content.decode(errors="replace")[:300] if response.content else ""
                figures.server_errors.append(
                    {"endpoint": endpoint, "status": response.status_code, "body": body}
                )
            path = node.value.operation.path
            if check_auth and path.startswith("/v1/") and 200 <= response.status_code < 300:
                figures.auth_bypasses += 1
        for check in recorder.checks.get(case_id, []):
            if check.failure_info is None or check.name == "not_a_server_error":
                continue  # server errors are counted from the responses above
            figures.failures[check.name] += 1
            if (check.name, endpoint) not in seen:
                seen.add((check.name, endpoint))
                message = str(check.failure_info.failure).strip().splitlines()
                figures.failure_examples[f"{check.name} {endpoint}"] = " ".join(message[:4])[:300]


def print_figures(runs: list[RunFigures]) -> None:
    endpoints = sorted({endpoint for figures in runs for endpoint in figures.cases})
    width = max(len(endpoint) for endpoint in endpoints) + 2
    print(f"{'endpoint':<{width}}" + "".join(f"{figures.name:>14}" for figures in runs))
    for endpoint in endpoints:
        print(f"{endpoint:<{width}}" + "".join(f"{figures.cases[endpoint]:>14}" for figures in runs))
    print(f"{'total':<{width}}" + "".join(f"{sum(figures.cases.values()):>14}" for figures in runs))
    for figures in runs:
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(figures.statuses.items()))
        print(f"\n[{figures.name}] {figures.seconds:.0f} s; responses by status: {statuses}")
        print(f"  server errors: {len(figures.server_errors)}; auth bypasses: {figures.auth_bypasses}")
        for error in figures.server_errors[:10]:
            print(f"    {error}")
        for check, count in sorted(figures.failures.items()):
            print(f"  {check}: {count} failing cases")
        for where, message in sorted(figures.failure_examples.items()):
            print(f"    {where}: {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100, help="hypothesis examples per endpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    # python-multipart warns on every malformed part the fuzzer sends; the figures say what matters.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="w2s-fuzz-") as state, fresh_database() as database_url:
        # Hypothesis keeps caches in ./.hypothesis unless told otherwise: keep the checkout clean.
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(state) / "hypothesis"))
        point_service_at(database_url, Path(state))
        from api.main import create_app

        seeded = seed_objects()
        app = create_app()
        runs = [
            run(
                "with key",
                app,
                schemathesis_config(
                    max_examples=args.max_examples, seed=args.seed, key=seeded.key, seeded=seeded
                ),
            ),
            run(
                "without key",
                app,
                schemathesis_config(max_examples=args.max_examples, seed=args.seed, key=None, seeded=seeded),
            ),
        ]
    print_figures(runs)
    total_cases = sum(sum(figures.cases.values()) for figures in runs)
    server_errors = sum(len(figures.server_errors) for figures in runs)
    bypasses = sum(figures.auth_bypasses for figures in runs)
    print(f"\ncases: {total_cases}; server errors: {server_errors}; auth bypasses: {bypasses}")
    if args.json:
        document = {
            "benchmark": "fuzz_api",
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "max_examples": args.max_examples,
            "seed": args.seed,
            "disabled_checks": list(DISABLED_CHECKS),
            "cases": total_cases,
            "server_errors": server_errors,
            "auth_bypasses": bypasses,
            "other_failures": sum(sum(figures.failures.values()) for figures in runs),
            "runs": {figures.name: figures.as_json() for figures in runs},
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if server_errors or bypasses else 0


if __name__ == "__main__":
    raise SystemExit(main())
