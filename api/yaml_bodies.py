"""Job and sweep specs may be POSTed as YAML (``Content-Type: application/yaml``), as the CLI reads
them from files: the body is turned into JSON before the route sees it, so validation and its
errors are the same.

Parsing YAML costs far more than reading JSON, so a YAML body is handled with care (issue 28: a
10 KB nested list sent without a key froze every request, ``/healthz`` too, for 13 s):

- the API key is checked first, by the routes' own check (``api.deps.current_team_id``, with its
  failed-authentication throttle and rate limit): without a valid key nothing is parsed;
- the parse runs in a worker thread, never in the event loop;
- the parser's events are walked before anything is built, and the walk stops at the first value
  past ``MAX_DEPTH`` levels or ``MAX_VALUES`` values, answered with 400 naming the limit (as a JSON
  body nested too deeply is: api.main);
- anchors and aliases are refused: a few hundred bytes of aliases can stand for gigabytes once
  expanded.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import bearer, current_team_id
from service.settings import get_settings

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
YAML_PATHS = frozenset({"/v1/jobs", "/v1/sweeps"})

# A job spec is a few levels deep and a few hundred values; a sweep of 20 x 20 models with their
# training options a few thousand. Far above what a spec needs, far below what takes time to parse.
MAX_DEPTH = 32
MAX_VALUES = 20_000

# libyaml's parser (PyYAML's wheels ship it) is ~20 times faster than the pure-Python one.
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class TooComplex(ValueError):
    """A body past MAX_DEPTH or MAX_VALUES: answered 400, naming the limit."""


def check_structure(text: str) -> None:
    """Walk the parser's events (nothing is built) and stop at the first alias, or at the first
    value past ``MAX_DEPTH`` levels or past ``MAX_VALUES`` values."""
    depth = values = 0
    for event in yaml.parse(text, Loader=SAFE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1
            raise ValueError(
                f"line {line}: anchors and aliases (*name) are not accepted; write the value out"
            )
        if isinstance(event, yaml.NodeEvent):  # a scalar, or the start of a list or a mapping
            values += 1
            if values > MAX_VALUES:
                raise TooComplex(too_many_values(event.start_mark.line + 1))
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise TooComplex(too_deep(event.start_mark.line + 1))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def too_deep(line: int) -> str:
    return (
        f"the YAML body is nested more than {MAX_DEPTH} levels deep (line {line}); a job spec is a few "
        "levels deep"
    )


def too_many_values(line: int) -> str:
    return (
        f"the YAML body holds more than {MAX_VALUES} values (line {line}); a job spec or a sweep holds a "
        "few hundred. Upload data with POST /v1/datasets and refer to it as 'upload:<id>'"
    )


def yaml_to_json(body: bytes) -> bytes:
    """The YAML document as JSON bytes. TooComplex past a limit; ValueError saying where it is not
    valid YAML, or what JSON cannot hold. Slow for a large body: call it off the event loop."""
    try:
        text = body.decode("utf-8")
        check_structure(text)
        document: Any = yaml.load(text, Loader=SAFE_LOADER)  # a safe loader: plain data only
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    except yaml.YAMLError as error:
        problem = str(getattr(error, "problem", None) or error)
        mark = getattr(error, "problem_mark", None)
        if "maximum nesting depth" in problem:  # libyaml's own limit (1,000 levels), met before ours
            raise TooComplex(too_deep(mark.line + 1 if mark is not None else 1)) from None
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{where}{problem}") from None
    try:
        return json.dumps(document, default=str).encode()
    except (TypeError, ValueError) as error:  # a date as a mapping key; an integer of 5,000 digits
        raise ValueError(f"the document cannot be read as JSON: {error}") from None


class YamlBodies:
    """Turns a YAML body POSTed to /v1/jobs or /v1/sweeps into JSON, after checking the API key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in YAML_PATHS:
            await self.app(scope, receive, send)
            return
        content_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
        if content_type not in YAML_TYPES:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            # The route's own check, remembered on the request: the route does not check again.
            await current_team_id(request, await bearer(request), get_settings())
        except Exception as error:  # 401, 403, 429, 503: answered as the route would have
            await (await _answer_as_the_app(request, error))(scope, receive, send)
            return
        body = b""
        while True:  # bounded: BodyLimit, outside this, refused anything over its limit
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            converted = await run_in_threadpool(yaml_to_json, body)
        except TooComplex as error:
            await JSONResponse({"detail": str(error)}, status_code=400)(scope, receive, send)
            return
        except ValueError as error:
            detail = [{"loc": ["body"], "msg": f"not valid YAML: {error}", "type": "yaml_invalid"}]
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
            return
        headers = MutableHeaders(scope=scope)
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(converted))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": converted, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer_as_the_app(request: Request, error: Exception) -> Response:
    """The response the app's own exception handlers (api.main) give ``error``: this middleware
    runs outside them, and a refused key must read the same here as from the route."""
    handlers = request.app.exception_handlers
    for kind in type(error).__mro__:
        if kind in handlers:
            return await handlers[kind](request, error)  # type: ignore[no-any-return]
    raise error
