"""Every migration upgrades and downgrades on Postgres, and the models match the migrated schema."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from service.models import Base
from svc_support import PG_ADMIN_URL, alembic_config


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"w2s_migrate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_each_revision_upgrades_and_downgrades(empty_database: str) -> None:
    config = alembic_config(empty_database)
    revisions = list(reversed(list(ScriptDirectory.from_config(config).walk_revisions())))
    engine = create_engine(empty_database)
    for revision in revisions:  # step up one at a time, and back down each step once
        command.upgrade(config, revision.revision)
        command.downgrade(config, revision.down_revision or "base")
        command.upgrade(config, revision.revision)
    assert set(inspect(engine).get_table_names()) >= {"jobs", "stages", "teams", "api_keys", "metric_points"}
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


# Team names from before 0014 (oldest first), and the key each must get: a valid name its case-folded
# form, unless an older team's folds the same; anything else "<folded>~<id>".
OLD_TEAMS = [
    ("t1", "alpha", "alpha"),
    ("t2", "ALPHA", "alpha~t2"),
    ("t3", "my team", "my team~t3"),
    ("t4", "\u0430lpha", "\u0430lpha~t4"),
    ("t5", "Beta", "beta"),
    ("t6", "x\u202e\x1b[31m", "x\u202e\x1b[31m~t6"),
]


@pytest.fixture(params=["postgresql", "sqlite"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind the service runs on: Postgres, and SQLite (the embedded default)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'w2s.db'}"
    else:
        yield request.getfixturevalue("empty_database")


def test_team_name_keys_for_existing_teams_up_and_down(any_database: str) -> None:
    config = alembic_config(any_database)
    command.upgrade(config, "0013")
    engine = create_engine(any_database)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as connection:
        for index, (team_id, name, _) in enumerate(OLD_TEAMS):
            connection.execute(
                text(
                    "INSERT INTO teams (id, name, weight, allow_trust_remote_code, created_at) "
                    "VALUES (:id, :name, 1.0, false, :at)"
                ),
                {"id": team_id, "name": name, "at": start + dt.timedelta(minutes=index)},
            )
        connection.execute(
            text(
                "INSERT INTO api_keys (id, team_id, name, key_hash, prefix, created_at) "
                "VALUES ('k1', 't1', '', 'hash', 'w2s_abc', :at)"
            ),
            {"at": start},
        )

    command.upgrade(config, "0014")  # invalid and colliding names do not stop it
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT id, name_key FROM teams")).all())
        names = dict(connection.execute(text("SELECT id, name FROM teams")).all())
    assert rows == {team_id: key for team_id, _, key in OLD_TEAMS}
    assert names == {team_id: name for team_id, name, _ in OLD_TEAMS}  # kept as they were
    with pytest.raises(IntegrityError), engine.begin() as connection:  # the database refuses a twin
        connection.execute(
            text(
                "INSERT INTO teams (id, name, name_key, weight, allow_trust_remote_code, created_at) "
                "VALUES ('t7', 'Alpha', 'alpha', 1.0, false, :at)"
            ),
            {"at": start},
        )

    command.downgrade(config, "0013")
    assert "name_key" not in {column["name"] for column in inspect(engine).get_columns("teams")}
    with engine.connect() as connection:  # no table was rebuilt: SQLite's cascades deleted nothing
        assert connection.execute(text("SELECT count(*) FROM teams")).scalar() == len(OLD_TEAMS)
        assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
    command.upgrade(config, "0014")
    with engine.connect() as connection:
        assert dict(connection.execute(text("SELECT id, name_key FROM teams")).all()) == rows
    engine.dispose()


def insert_row(connection: Any, table: str, values: dict[str, Any]) -> None:
    """Insert ``values``, filling every other NOT NULL column without a default with a plain value of
    its type (the schema as of the revision the database is at)."""
    row = dict(values)
    for column in inspect(connection).get_columns(table):
        if column["name"] in row or column["nullable"] or column.get("default") is not None:
            continue
        kind = str(column["type"]).upper()
        if "INT" in kind:
            row[column["name"]] = 0
        elif any(word in kind for word in ("FLOAT", "DOUBLE", "REAL", "NUMERIC")):
            row[column["name"]] = 0.0
        elif "BOOL" in kind:
            row[column["name"]] = False
        elif "TIME" in kind:
            row[column["name"]] = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        else:
            row[column["name"]] = "{}" if "JSON" in kind else "x"
    names = ", ".join(f'"{name}"' for name in row)
    connection.execute(text(f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + n for n in row)})"), row)


def test_existing_checkpoints_are_held_by_the_stages_that_name_them(any_database: str) -> None:
    """0013: a hold for every finished stage whose result names a recorded checkpoint, whichever team
    computed it, so no team's retention removes a checkpoint another team's stage names."""
    config = alembic_config(any_database)
    command.upgrade(config, "0012")
    engine = create_engine(any_database)
    key = "k" * 64
    with engine.begin() as connection:
        for team in ("alpha", "beta"):
            insert_row(connection, "teams", {"id": team, "name": team})
            insert_row(connection, "jobs", {"id": f"job-{team}", "team_id": team, "status": "succeeded"})
        result = json.dumps({"key": key, "checkpoint": "c" * 64, "accuracy": 0.5})
        for stage_id, team, status in (("s-a", "alpha", "succeeded"), ("s-b", "beta", "cached")):
            insert_row(
                connection,
                "stages",
                {"id": stage_id, "job_id": f"job-{team}", "team_id": team, "kind": "weak", "seed": 0}
                | {"order": 0, "stage_key": key, "status": status, "result": result},
            )
        insert_row(
            connection,
            "artifacts",
            {"stage_key": key, "name": "checkpoint", "uri": "store#blobs/" + "c" * 64, "team_id": "alpha"}
            | {"size_bytes": 1234},
        )
    command.upgrade(config, "0013")
    with engine.connect() as connection:
        holds = connection.execute(text("SELECT stage_id, team_id, size_bytes FROM checkpoint_holds")).all()
    assert sorted(holds) == [("s-a", "alpha", 1234), ("s-b", "beta", 1234)]
    command.downgrade(config, "0012")
    with engine.connect() as connection:  # no table was rebuilt: SQLite's cascades deleted nothing
        assert connection.execute(text("SELECT count(*) FROM stages")).scalar() == 2
        assert connection.execute(text("SELECT count(*) FROM teams")).scalar() == 2
    engine.dispose()
