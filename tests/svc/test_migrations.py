"""Every migration upgrades and downgrades on Postgres, and the models match the migrated schema."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

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
