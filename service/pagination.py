"""Keyset pagination, newest first, on (created_at, id): one cursor format for every listing
(jobs, sweeps, datasets), so a deep page costs what the first does."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, tuple_

from service.errors import InvalidInput


def encode_cursor(row: Any) -> str:
    """The cursor after ``row`` (anything with ``created_at`` and ``id``)."""
    raw = json.dumps([row.created_at.isoformat(), row.id])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return dt.datetime.fromisoformat(created), str(row_id)
    except (ValueError, TypeError) as error:
        raise InvalidInput(
            "cursor: not a cursor from a previous page; omit it to start at the first page"
        ) from error


def newest_first(query: Select[Any], model: Any, *, limit: int, cursor: str | None) -> Select[Any]:
    """``query`` ordered newest first, after ``cursor``, one row more than a page (see :func:`page`)."""
    if cursor:
        created, row_id = decode_cursor(cursor)
        # A row comparison: the (…, created_at, id) index seeks straight to the cursor.
        query = query.where(tuple_(model.created_at, model.id) < tuple_(created, row_id))
    return query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)


def page(rows: Sequence[Any], limit: int) -> tuple[list[Any], str | None]:
    """A page of ``rows`` (fetched with one extra) and the cursor of the next page, if any."""
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return list(rows[:limit]), next_cursor
