"""Real tool servers on loopback for the server-side tools' tests: an MCP server built with the
official `mcp` SDK (MCPServer, streamable HTTP transport) and a webhook HTTP server (Starlette),
each served by uvicorn on a free port in a thread of the test process.

The MCP server is reachable at /mcp, and at /private/mcp only with `Authorization: Bearer <TOKEN>`.
Both servers note what reached them, so tests can tell a call that was sent from one that was not.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

import uvicorn
from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

TOKEN = "s3cret-token-for-tests"
SLOW_S = 5.0                  # how long the slow tools take: far beyond the tests' timeouts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, name: str):
    """Serve an ASGI app on 127.0.0.1 in a thread until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"{name}-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the {name} server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Seen:
    """What reached a server: MCP tool calls (name, arguments) or webhook POSTs (path, JSON body)."""
    calls: list = field(default_factory=list)
    lists: int = 0

    def clear(self) -> None:
        self.calls.clear()
        self.lists = 0


class ClosedSchemas(MCPServer):
    """MCPServer publishing closed argument schemas (additionalProperties: false). A random-weight
    model decoding under a schema that admits any other property never ends its call; a real model
    closes the object itself."""

    async def list_tools(self):
        tools = await super().list_tools()
        for tool in tools:
            tool.input_schema = {**tool.input_schema, "additionalProperties": False}
        return tools


Short = Annotated[str, Field(max_length=12)]
Small = Annotated[int, Field(ge=0, le=99)]


def mcp_app(seen: Seen):
    """An MCP server (the SDK's MCPServer) with tools for every case, as a Starlette app."""
    server = ClosedSchemas("expertmesh-test-tools", log_level="WARNING")

    @server.tool(description="Echo the text back")
    def echo(text: Short) -> str:
        seen.calls.append(("echo", {"text": text}))
        return f"echo: {text}"

    @server.tool(description="Add two integers")
    def add(a: Small, b: Small) -> str:
        seen.calls.append(("add", {"a": a, "b": b}))
        return str(a + b)

    @server.tool(description="Answer after a long time")
    async def slow(note: Short = "") -> str:
        seen.calls.append(("slow", {"note": note}))
        await asyncio.sleep(SLOW_S)
        return "late"

    @server.tool(description="Always fails")
    def fail(reason: Short = "broken") -> str:
        seen.calls.append(("fail", {"reason": reason}))
        raise ToolError(f"the tool failed on purpose: {reason}")     # the SDK passes a ToolError's text on

    @server.tool(description="Returns a picture")
    def picture() -> Image:
        seen.calls.append(("picture", {}))
        return Image(data=b"\x89PNG\r\n\x1a\n", format="png")

    starlette = server.streamable_http_app(streamable_http_path="/mcp", stateless_http=True)

    async def app(scope, receive, send):
        if scope["type"] == "http":
            if scope["path"].startswith("/private/"):
                headers = dict(scope.get("headers") or [])
                if headers.get(b"authorization") != f"Bearer {TOKEN}".encode():
                    await _plain(send, 401, b"missing or wrong bearer token")
                    return
                scope = {**scope, "path": scope["path"].removeprefix("/private"),
                         "raw_path": scope["path"].removeprefix("/private").encode()}
            if scope["method"] == "POST":
                body, receive = await _peek(receive)
                if b'"tools/list"' in body:
                    seen.lists += 1
        await starlette(scope, receive, send)

    app.server = server                    # tests add and remove tools while it runs
    return app


async def _peek(receive):
    """Read a request's whole body, and a `receive` that replays it."""
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, replayed = b"".join(chunks), False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _plain(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def webhook_app(seen: Seen):
    """Webhook tools: each path answers one way (JSON, slow, 500, bytes that are not text, bad JSON)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def note(request: Request) -> dict:
        body = await request.json()
        seen.calls.append((request.url.path, body))
        return body

    async def weather(request: Request):
        body = await note(request)
        return JSONResponse({"city": body.get("city"), "temperature_c": 21})

    async def secured(request: Request):
        body = await note(request)
        if request.headers.get("x-api-key") != TOKEN:
            return PlainTextResponse("wrong api key", status_code=401)
        return PlainTextResponse(f"hello {body.get('name')}")

    async def slow(request: Request):
        await note(request)
        await asyncio.sleep(SLOW_S)
        return PlainTextResponse("late")

    async def broken(request: Request):
        await note(request)
        return PlainTextResponse("database is down", status_code=500)

    async def binary(request: Request):
        await note(request)
        return Response(b"\xff\xfe\x00\x81", media_type="application/octet-stream")

    async def bad_json(request: Request):
        await note(request)
        return Response(b"{not json", media_type="application/json")

    return Starlette(routes=[Route(path, handler, methods=["POST"]) for path, handler in (
        ("/weather", weather), ("/secured", secured), ("/slow", slow), ("/broken", broken), ("/binary", binary),
        ("/bad-json", bad_json))])


WEATHER_PARAMETERS = {"type": "object", "additionalProperties": False, "required": ["city"],
                      "properties": {"city": {"type": "string", "maxLength": 12}}}


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))
