"""team names compared ignoring case: ``teams.name_key`` under a unique index

A team's name is NFKC-normalised, stripped and limited to ASCII letters, digits, '-', '_' and '.'
(service/team_names.py); ``name_key`` is that name case-folded, and its unique index makes the
database refuse "alpha" once "Alpha" exists, also when two requests race.

Existing rows: names are kept exactly as they are (readable, and found by that exact text). A valid
name gets its case-folded key; the oldest team (by creation, then id) keeps the plain key of names
that fold together. A later team whose name folds onto a taken key, and every team whose name breaks
the new rule (a space, a Cyrillic letter, a slash, a control character...), gets the deterministic
key ``<folded name, first 60 characters>~<team id>``: '~' is not allowed in a name, so such a key can
never collide with a future team's, and team ids are unique. Renaming such a team is an
administrator's decision, not the migration's.

No table is rebuilt: on SQLite (the embedded default, foreign keys on) rebuilding ``teams`` would
cascade-delete every team's keys and jobs. So the column is added and dropped with plain ALTER
TABLE, and it stays nullable in the schema (SQLite cannot add NOT NULL in place); the model fills it
on every insert.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 00:30:00
"""

from __future__ import annotations

import re
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The rule as of this revision (service/team_names.py), kept here so the migration never changes.
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUFFIXED_PREFIX = 60


def folded(name: str) -> str:
    return unicodedata.normalize("NFKC", name).strip().casefold()


def existing_keys(rows: list[tuple[str, str]]) -> dict[str, str]:
    """Team id -> key for rows of (id, name) in creation order (see the module's docstring)."""
    keys: dict[str, str] = {}
    taken: set[str] = set()
    for team_id, name in rows:
        key = folded(name)
        if VALID_NAME.fullmatch(unicodedata.normalize("NFKC", name).strip()) and key not in taken:
            taken.add(key)
            keys[team_id] = key
        else:
            keys[team_id] = f"{key[:SUFFIXED_PREFIX]}~{team_id}"
    return keys


def upgrade() -> None:
    op.add_column("teams", sa.Column("name_key", sa.String(100), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, name FROM teams ORDER BY created_at, id")).all()
    keys = existing_keys([(team_id, name) for team_id, name in rows])
    if keys:
        bind.execute(
            sa.text("UPDATE teams SET name_key = :key WHERE id = :id"),
            [{"id": team_id, "key": key} for team_id, key in keys.items()],
        )
    op.create_index("ix_teams_name_key", "teams", ["name_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_teams_name_key", table_name="teams")
    op.drop_column("teams", "name_key")  # ALTER TABLE ... DROP COLUMN: SQLite 3.35+, no rebuild
