"""How the service's figures read to people, the same in the dashboard (api/web) and in the ``w2s``
client (w2s_service/user_cli.py): durations, ages, percentages and model names (the library's
w2s.plots.short_model, which sweeps label models with too). Standard library and w2s only, so the
client imports it without the server's dependencies."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable

from w2s.plots import short_model

__all__ = ["ago", "distinct_model_names", "duration", "percent", "short_model", "short_names"]

# What a missing figure reads as (a job that has not started has no run time).
MISSING = "—"


def duration(seconds: float | None) -> str:
    """``1.3 s``, ``45 s``, ``4 min 28 s``, ``12 min``, ``3 h 05 min``, ``2 d 3 h``. The dashboard's
    live counters (api/web/static/app.js ``duration``) tick in this same format."""
    if seconds is None:
        return MISSING
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 10:
        return f"{minutes} min {secs:02d} s"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def ago(moment: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """How long ago: ``just now``, ``12 s ago``, ``4 min ago``, ``3 h ago``, ``2 d ago`` (the
    dashboard's live counters, app.js ``ago``, tick in this format too)."""
    if moment is None:
        return MISSING
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)  # SQLite's are naive UTC
    seconds = ((now or dt.datetime.now(dt.UTC)) - moment).total_seconds()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def percent(fraction: float) -> str:
    """Rounded down: only what is complete reads 100% (199 of 200 is 99%, not 100%)."""
    return f"{math.floor(max(0.0, min(1.0, fraction)) * 100 + 1e-9)}%"


def distinct_model_names(names: Iterable[str]) -> dict[str, str]:
    """Each model as short as it can be while no two different models read the same: a directory
    by as many of its last parts as set it apart (``/a/ckpt`` and ``/b/ckpt`` read ``a/ckpt`` and
    ``b/ckpt``); hub ids whole. Never cut inside a part."""
    models = set(names)
    shown: dict[str, str] = {}
    for name in models:
        shown[name] = name
        if short_model(name) == name:  # a hub id
            continue
        parts = name.rstrip("/").split("/")
        others = [other.rstrip("/") for other in models if other != name]
        for count in range(1, len(parts) + 1):
            tail = "/".join(parts[-count:])
            if not any(other == tail or other.endswith("/" + tail) for other in others):
                shown[name] = tail
                break
    return shown


_PATH_TOKEN = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/(?:[^\s/]+/)*([^\s/]+)/?")


def short_names(text: str) -> str:
    """Model paths inside a text as their last part: sweeps name their jobs
    ``"<sweep>: <weak model> -> <strong model>"``, and full paths make a table unreadable."""
    return _PATH_TOKEN.sub(lambda match: match.group(1), text)
