"""Saved checkpoints (``save_checkpoint: true``) and who holds them.

Stages of any team share results through the stage cache: a stage whose key another stage already
computed completes from that result, checkpoint included. So a checkpoint belongs to every stage whose
result names it, not to the team that computed it. Each such stage has a row in
``checkpoint_holds``:

- a team keeps the checkpoints its own stages hold, at most its last ``W2S_CHECKPOINTS_KEPT`` stage
  keys; older ones are *released*: the hold is dropped and the stage's result says its checkpoint
  was removed (``checkpoint: null``, ``checkpoint_removed``), so no result names a missing file;
- a checkpoint file is removed only once no stage of any team holds it; its ``artifacts`` row stays
  as a tombstone (``removed_at``), so no cached completion can name it again;
- a team is charged for the checkpoints its stages hold, whoever computed them, and never for one
  kept only because another team's stages still hold it (service/storage.py).

The race that matters: a stage completing from the cache (planning, the dispatch round or a worker
that found the stored result) while another team's retention removes the same checkpoint. Both
take the checkpoint's ``artifacts`` row lock: the completion takes its hold only if the row is live
and names the same file; the removal tombstones the row only if no hold is left, and removes the
file after that commits. A completion that loses the race does not complete: its stage runs again.
New checkpoints are written under a fresh name per computation (w2s.store.put_checkpoint), so
removing one never removes a later run's file of the same stage key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db import insert_ignoring_duplicates, session_scope, upsert
from service.models import Artifact, CheckpointHold, Stage, utcnow

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"  # artifacts.name of a saved checkpoint
BLOB = "#blobs/"  # a checkpoint stored as a content-addressed blob, as stores did before 0013
FILE = "#checkpoints/"


def checkpoint_uri(store_uri: str, ref: str) -> str:
    """Where a checkpoint reference (a stage result's ``checkpoint``) lives, as artifacts name it."""
    return f"{store_uri}{FILE if '/' in ref else BLOB}{ref}"


def ref_of(uri: str) -> str:
    """The checkpoint reference an artifact URI names (``checkpoint_uri``'s inverse)."""
    for marker in (FILE, BLOB):
        if marker in uri:
            return uri.rsplit(marker, 1)[1]
    raise ValueError(f"not a checkpoint URI: {uri!r}")


def _lock_live(session: Session, key: str, ref: str) -> Artifact | None:
    """The checkpoint row of ``key``, locked to the end of the transaction, if it is live and names
    ``ref``; None if it was removed or names another run's file."""
    query = select(Artifact).where(Artifact.stage_key == key, Artifact.name == CHECKPOINT)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None or row.removed_at is not None or ref_of(row.uri) != ref:
        return None
    return row


def reusable(session: Session, record: dict[str, Any], store_uri: str) -> bool:
    """Whether a stored result may complete another stage: it names no checkpoint, or one that is
    still stored (its row is locked until the transaction ends, so it cannot be removed meanwhile).
    A result whose checkpoint was released (``checkpoint_removed``) is never reused: its stage key
    asks for weights, so the stage runs again. Call :func:`hold` for the stage in the same
    transaction once it completes."""
    if record.get("checkpoint_removed"):
        return False
    ref = record.get("checkpoint")
    if not ref:
        return True
    # A result stored outside the service (a `w2s run` on the same store) has no row yet: record it,
    # unsized. A removed checkpoint keeps its row (a tombstone), so it is never recorded again here.
    session.execute(
        insert_ignoring_duplicates(session, Artifact.__table__),
        [{"stage_key": record["key"], "name": CHECKPOINT, "uri": checkpoint_uri(store_uri, ref)}],
    )
    return _lock_live(session, record["key"], ref) is not None


def record_computed(
    session: Session, record: dict[str, Any], store_uri: str, team_id: str, size: int
) -> None:
    """A stage computed ``record`` and saved its checkpoint: the key's checkpoint row names this
    file (live again if an older file of the key was removed)."""
    session.execute(
        upsert(session, Artifact.__table__, ("stage_key", "name")),
        [
            {
                "stage_key": record["key"],
                "name": CHECKPOINT,
                "uri": checkpoint_uri(store_uri, record["checkpoint"]),
                "created_at": utcnow(),
                "team_id": team_id,
                "size_bytes": size,
                "removed_at": None,
            }
        ],
    )


def hold(session: Session, stage_id: str, team_id: str, record: dict[str, Any]) -> None:
    """Stage ``stage_id`` has ``record`` as its result: it holds the checkpoint the record names."""
    ref = record.get("checkpoint")
    if not ref:
        return
    row = session.execute(
        select(Artifact.uri, Artifact.size_bytes).where(
            Artifact.stage_key == record["key"], Artifact.name == CHECKPOINT
        )
    ).one()
    session.execute(
        insert_ignoring_duplicates(session, CheckpointHold.__table__),
        [
            {
                "stage_id": stage_id,
                "team_id": team_id,
                "stage_key": record["key"],
                "uri": row.uri,
                "size_bytes": row.size_bytes,
                "created_at": utcnow(),
            }
        ],
    )


@dataclass(frozen=True)
class Removal:
    """A tombstoned checkpoint whose file (and the stored result naming it) are still in the store."""

    stage_key: str
    uri: str
    shared_blob: bool  # a pre-0013 content-addressed blob another key's live row still names


def release_old(session: Session, team_id: str, keep: int) -> int:
    """Keep the checkpoints of the team's ``keep`` most recently held stage keys; release its holds
    on older ones (their stages' results say so), and tombstone those no stage holds any more (their
    files are removed by :func:`sweep`). Returns the stage keys tombstoned."""
    newest = func.max(CheckpointHold.created_at)
    old_keys = list(
        session.scalars(
            select(CheckpointHold.stage_key)
            .where(CheckpointHold.team_id == team_id)
            .group_by(CheckpointHold.stage_key)
            .order_by(newest.desc(), CheckpointHold.stage_key.desc())
            .offset(keep)
        )
    )
    if not old_keys:
        return 0
    released = session.scalars(
        delete(CheckpointHold)
        .where(CheckpointHold.team_id == team_id, CheckpointHold.stage_key.in_(old_keys))
        .returning(CheckpointHold.stage_id)
    ).all()
    reason = f"removed: your team keeps the checkpoints of its last {keep} stage keys (W2S_CHECKPOINTS_KEPT)"
    for stage_id in sorted(released):
        result = session.scalar(select(Stage.result).where(Stage.id == stage_id))
        if result and result.get("checkpoint"):
            session.execute(
                update(Stage)
                .where(Stage.id == stage_id)
                .values(result={**result, "checkpoint": None, "checkpoint_removed": reason})
                .execution_options(synchronize_session=False)
            )
    tombstoned = 0
    for key in sorted(old_keys):  # one order for the row locks
        query = select(Artifact).where(
            Artifact.stage_key == key, Artifact.name == CHECKPOINT, Artifact.removed_at.is_(None)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        row = session.scalar(query)
        if row is None:
            continue
        if session.scalar(select(CheckpointHold.stage_id).where(CheckpointHold.stage_key == key).limit(1)):
            continue  # another stage (of this team or another) still holds it
        row.removed_at = utcnow()
        tombstoned += 1
    session.flush()
    return tombstoned


def teams_over(session: Session, keep: int) -> list[str]:
    """The teams whose stages hold checkpoints of more than ``keep`` stage keys."""
    return list(
        session.scalars(
            select(CheckpointHold.team_id)
            .group_by(CheckpointHold.team_id)
            .having(func.count(func.distinct(CheckpointHold.stage_key)) > keep)
        )
    )


def pending_removals(session: Session, limit: int = 500) -> list[Removal]:
    """Tombstoned checkpoints whose files are still to be removed from the store."""
    rows = session.execute(
        select(Artifact.stage_key, Artifact.uri)
        .where(
            Artifact.name == CHECKPOINT, Artifact.removed_at.is_not(None), Artifact.files_removed_at.is_(None)
        )
        .order_by(Artifact.removed_at)
        .limit(limit)
    ).all()
    removals = []
    for key, uri in rows:
        shared = BLOB in uri and session.scalar(
            select(Artifact.stage_key)
            .where(Artifact.uri == uri, Artifact.removed_at.is_(None), Artifact.stage_key != key)
            .limit(1)
        )
        removals.append(Removal(key, uri, shared_blob=bool(shared)))
    return removals


def remove_files(store: Any, removals: list[Removal], results_namespace: str = "stages") -> None:
    """Remove each tombstoned checkpoint's file, then the stored result that names it (so the stage
    cache no longer offers it). Files are never reused by a later run (fresh names), so removing one
    is safe whatever happened since; a stored result rewritten meanwhile by a new run names another
    file and is left alone."""
    for removal in removals:
        ref = ref_of(removal.uri)
        if not removal.shared_blob:
            store.delete_checkpoint(ref)
        stored = store.get_record(results_namespace, removal.stage_key)
        if stored is not None and stored.get("checkpoint") == ref:
            store.delete_record(results_namespace, removal.stage_key)


def mark_removed(session: Session, removals: list[Removal]) -> None:
    for removal in removals:
        session.execute(
            update(Artifact)
            .where(
                Artifact.stage_key == removal.stage_key,
                Artifact.name == CHECKPOINT,
                Artifact.uri == removal.uri,
                Artifact.removed_at.is_not(None),
            )
            .values(files_removed_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def sweep(store: Any, keep: int, *, team_id: str | None = None) -> int:
    """Apply the retention rule (to ``team_id``, or to every team over it) and remove from the store
    the files of every checkpoint no stage holds; returns the files removed. Idempotent: a sweep cut
    short (a crash, the store down) leaves tombstones the next one finishes."""
    with session_scope() as session:
        for team in [team_id] if team_id else teams_over(session, keep):
            release_old(session, team, keep)
    with session_scope() as session:
        removals = pending_removals(session)
    if not removals:
        return 0
    remove_files(store, removals)
    with session_scope() as session:
        mark_removed(session, removals)
    logger.info("%d checkpoint(s) no stage holds removed from the store", len(removals))
    return len(removals)


def held_bytes(session: Session, team_ids: list[str]) -> dict[str, int]:
    """Per team, the bytes of the checkpoints its stages hold (each stage key's file once)."""
    per_key = (
        select(
            CheckpointHold.team_id,
            CheckpointHold.stage_key,
            func.max(CheckpointHold.size_bytes).label("size"),
        )
        .where(CheckpointHold.team_id.in_(team_ids))
        .group_by(CheckpointHold.team_id, CheckpointHold.stage_key)
        .subquery()
    )
    rows = session.execute(select(per_key.c.team_id, func.sum(per_key.c.size)).group_by(per_key.c.team_id))
    return {team_id: int(size or 0) for team_id, size in rows}
