"""Log lines an operator can follow across a fleet: with ``W2S_LOG_FORMAT=json`` every line is one
JSON object (time, level, logger, message, and the ``job_id``/``stage_id`` of the work the line is
about), ready for Loki, Elasticsearch or CloudWatch; ``text`` (the default) stays human-readable.

The ids come from a context the stage task and the control tasks set (``log_context``), so every
line logged while a stage runs names it, whichever module logs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterator

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("w2s_log_context", default={})  # noqa: B039
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Lines logged inside carry these ids (job_id, stage_id)."""
    token = _context.set({**_context.get(), **{key: value for key, value in ids.items() if value}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    FIELDS = ("job_id", "stage_id", "worker")

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line |= {key: getattr(record, key) for key in self.FIELDS if getattr(record, key, None)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _Noise(logging.Filter):
    """Lines an operator can do nothing about: kombu's 'No hostname was supplied' for the embedded
    filesystem transport, which has no host."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No hostname was supplied")


def configure_logging(log_format: str, level: int = logging.INFO, *, force: bool = False) -> None:
    """The root logger's one handler: JSON lines or text, with the work's ids attached. Like
    ``logging.basicConfig``, nothing changes where logging is already set up (a test run calling a
    command in-process) unless ``force``. Libraries' start-up chatter is kept out either way."""
    logging.getLogger("kombu.connection").addFilter(_Noise())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin and context lines, at every start
    root = logging.getLogger()
    if root.handlers and not force:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root.handlers[:] = [handler]
    root.setLevel(level)
