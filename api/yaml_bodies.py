"""Job and sweep specs may be POSTed as YAML (``Content-Type: application/yaml``), as the CLI reads
them from files: the body is turned into JSON before the route sees it, so validation and its
errors are the same. YAML anchors and aliases are refused: a few hundred bytes of aliases can stand
for gigabytes once expanded."""

from __future__ import annotations

import json
from typing import Any

import yaml
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
YAML_PATHS = frozenset({"/v1/jobs", "/v1/sweeps"})


def yaml_to_json(body: bytes) -> bytes:
    """The YAML document as JSON bytes; ValueError saying where it is not valid YAML."""
    try:
        text = body.decode("utf-8")
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise ValueError(
                    f"line {mark.line + 1}: anchors and aliases (*name) are not accepted; write the value out"
                )
        document: Any = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{where}{getattr(error, 'problem', None) or error}") from None
    return json.dumps(document, default=str).encode()


class YamlBodies:
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
        body = b""
        while True:  # bounded: BodyLimit, outside this, refused anything over its limit
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            converted = yaml_to_json(body)
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
