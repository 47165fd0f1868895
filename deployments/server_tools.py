"""Server-side tools: MCP servers and webhooks the service calls on the model's behalf.

A tenant's `tools` config (or the top-level one) names MCP servers (streamable HTTP) and webhook
tools; a Responses API request may add MCP servers of its own on an allow-listed host. For one
request the registry resolves them into a `ToolSet`:

    ToolRegistry.resolve(tenant, request's mcp tools) -> list every MCP server's tools (cached per
    server; a listing that fails leaves that server out and says why) -> `ServerTool`s under the
    function names the model sees -> ToolSet.call(name, arguments) -> ToolResult

Every failure is a `ToolResult` with an error (arguments that do not validate against the tool's
schema, a timeout, an HTTP or MCP error, output the model cannot read): the model reads it as the
tool's answer and the client sees it, and the request goes on. Nothing here raises into a request,
except the 400s for MCP servers a request may not name.

Connections are per call: one streamable HTTP session (initialize, then list or call) whose
lifetime is that of the call, so nothing ties an MCP server to an ingress replica, and a timeout
bounds connecting too. Headers come from a secret (an environment variable or a mounted file, read
on each use) and are never logged or echoed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from cluster.config import WEBHOOK_LABEL, ClusterConfig, McpServerConfig, SecretHeaders, ToolsSection, WebhookTool
from deployments.protocol import APIError

log = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 100_000        # a tool result longer than this is refused, not cut: the model would misread half
MAX_LIST_PAGES = 20               # tools/list pages followed per server
REQUEST_SERVERS_CACHED = 64       # request-supplied MCP servers whose listings an ingress replica keeps
OUTCOMES = ("ok", "error", "timeout", "invalid_arguments", "invalid_output")


# -- results -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolResult:
    """What a call produced: `output` for the model, or an `error` (then `output` is None)."""
    output: str | None = None
    error: str | None = None
    outcome: str = "ok"                    # one of OUTCOMES (the metrics' label)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def for_model(self) -> str:
        """The tool message the model reads."""
        return self.output if self.error is None else f"Error: {self.error}"


def _failed(outcome: str, message: str) -> ToolResult:
    return ToolResult(None, message, outcome)


class ToolError(Exception):
    """A failure of a listing or a call; `outcome` says which kind (OUTCOMES)."""

    def __init__(self, message: str, outcome: str = "error"):
        super().__init__(message)
        self.outcome = outcome


def _innermost(error: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: what an anyio task group raised for."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    """A failure in a sentence: the innermost cause of an exception group, without headers or bodies."""
    error = _innermost(error)
    from mcp.shared.exceptions import MCPError

    if isinstance(error, MCPError):
        return f"MCP error {error.code}: {error.message}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- secrets -----------------------------------------------------------------------------------------

def secret_headers(secret: SecretHeaders | None) -> dict[str, str]:
    """The headers a secret holds (a JSON object of name -> value). Errors name the variable or
    file, never what it holds."""
    if secret is None:
        return {}
    if secret.env is not None:
        where, raw = f"environment variable ${secret.env}", os.environ.get(secret.env)
        if raw is None:
            raise ToolError(f"the headers secret {where} is not set")
    else:
        where = f"file {secret.file}"
        try:
            with open(secret.file, encoding="utf-8") as f:
                raw = f.read()
        except OSError as error:
            raise ToolError(f"the headers secret {where} cannot be read ({error.strerror})") from None
    try:
        headers = json.loads(raw)
    except ValueError:
        headers = None
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ToolError(f"the headers secret {where} must hold a JSON object of header name -> string value")
    return headers


# -- argument validation -----------------------------------------------------------------------------

def parse_arguments(arguments: str, schema: dict | None) -> dict:
    """The model's arguments (a JSON string) as an object that validates against `schema`, or a
    ToolError (invalid_arguments) that says where it does not."""
    import jsonschema

    try:
        value = json.loads(arguments or "{}")
    except ValueError as error:
        raise ToolError(f"the arguments are not JSON ({error})", "invalid_arguments") from None
    if not isinstance(value, dict):
        raise ToolError("the arguments must be a JSON object", "invalid_arguments")
    if schema:
        validator = jsonschema.validators.validator_for(schema)(schema)
        problem = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path)
            raise ToolError(f"the arguments do not match the tool's schema: {problem.message}"
                            + (f" (at {where})" if where else ""), "invalid_arguments")
    return value


def _checked_output(text: str) -> str:
    if len(text) > MAX_OUTPUT_CHARS:
        raise ToolError(f"the tool returned {len(text)} characters, more than the {MAX_OUTPUT_CHARS} a tool "
                        "result may have", "invalid_output")
    return text


# -- MCP servers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class McpTool:
    """One tool as an MCP server lists it."""
    name: str
    description: str | None
    input_schema: dict
    annotations: dict | None = None

    def listing(self) -> dict:
        """As an `mcp_list_tools` item shows it (OpenAI's shape)."""
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema,
                "annotations": self.annotations}


class McpServer:
    """An MCP server over streamable HTTP (the official `mcp` SDK's client). Its tool listing is
    cached for `cache_s`, and fetched again after any failed call (the tool may be gone or changed)."""

    def __init__(self, label: str, url: str, *, allowed_tools: list[str] | None = None,
                 secret: SecretHeaders | None = None, headers: dict[str, str] | None = None,
                 timeout_s: float = 30.0, cache_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.label, self.url = label, url
        self.allowed_tools = None if allowed_tools is None else set(allowed_tools)
        self.secret, self._headers = secret, dict(headers or {})
        self.timeout_s, self.cache_s, self.clock = timeout_s, cache_s, clock
        self._listing: tuple[float, list[McpTool]] | None = None
        self._listing_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: McpServerConfig, cache_s: float) -> "McpServer":
        return cls(config.server_label, config.server_url, allowed_tools=config.allowed_tools,
                   secret=config.headers_from_secret, timeout_s=config.timeout_s, cache_s=cache_s)

    def __repr__(self) -> str:                 # never the headers
        return f"McpServer({self.label!r}, {self.url!r})"

    async def tools(self) -> list[McpTool]:
        """The tools the model may call (allowed_tools applied); ToolError when the server cannot list them."""
        async with self._listing_lock:
            if self._listing is not None and self.clock() - self._listing[0] < self.cache_s:
                return self._listing[1]
            listed = await self._run(self._list, "listing its tools")
            self._listing = (self.clock(), listed)
        return listed

    def forget_listing(self) -> None:
        self._listing = None

    async def call(self, name: str, arguments: dict) -> ToolResult:
        try:
            result = await self._run(lambda session: self._call(session, name, arguments), f"calling {name}")
        except ToolError as error:
            result = _failed(error.outcome, str(error))
        if not result.ok:                # the tool may be gone or changed, the server restarted: list again
            self.forget_listing()
        return result

    async def _run(self, work, doing: str):
        """Open a session, run `work(session)`, close it: all within timeout_s."""
        import httpx2
        from mcp.client.session import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        refused: list[str] = []          # HTTP errors the SDK's error messages do not name

        async def note_status(response) -> None:
            if response.status_code >= 400:
                refused.append(f"HTTP {response.status_code} {response.reason_phrase}".strip())

        try:
            async with asyncio.timeout(self.timeout_s):
                headers = {**await asyncio.to_thread(secret_headers, self.secret), **self._headers}
                async with httpx2.AsyncClient(headers=headers, timeout=self.timeout_s, trust_env=False,
                                              event_hooks={"response": [note_status]}) as http, \
                        streamable_http_client(self.url, http_client=http) as (read, write), \
                        ClientSession(read, write) as session:
                    await session.initialize()
                    return await work(session)
        except TimeoutError:
            raise ToolError(f"MCP server {self.label!r} did not answer within {self.timeout_s:g} s ({doing})",
                            "timeout") from None
        except Exception as error:      # connection, HTTP and protocol errors: the model is told
            if isinstance(_innermost(error), ToolError):      # ours, out of the SDK's task groups
                raise _innermost(error) from None
            status = f" ({refused[-1]})" if refused else ""
            raise ToolError(f"MCP server {self.label!r} failed {doing}{status}: {_describe(error)}") from None

    async def _list(self, session) -> list[McpTool]:
        from mcp_types import PaginatedRequestParams

        tools, cursor = [], None
        for _ in range(MAX_LIST_PAGES):
            page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        return [McpTool(t.name, t.description, t.input_schema or {"type": "object", "properties": {}},
                        t.annotations.model_dump(exclude_none=True) if t.annotations else None)
                for t in tools if self.allowed_tools is None or t.name in self.allowed_tools]

    async def _call(self, session, name: str, arguments: dict) -> ToolResult:
        result = await session.call_tool(name, arguments)
        texts, other = [], []
        for block in result.content:
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "resource" and hasattr(block.resource, "text"):
                texts.append(block.resource.text)
            else:
                other.append(block.type)
        if result.is_error:
            return _failed("error", "".join(texts) or f"the tool {name!r} reported an error")
        if other and not texts and result.structured_content is None:
            raise ToolError(f"the tool returned {', '.join(sorted(set(other)))} content, which this model cannot "
                            "read; only text (or structured content) can be a tool's result", "invalid_output")
        if texts:
            return ToolResult(_checked_output("\n".join(texts)))
        return ToolResult(_checked_output(json.dumps(result.structured_content, ensure_ascii=False)))


# -- webhooks ----------------------------------------------------------------------------------------

class Webhook:
    """A function tool served by POSTing its arguments as JSON to a URL; the response body is the result."""

    def __init__(self, config: WebhookTool):
        self.config = config

    def __repr__(self) -> str:
        return f"Webhook({self.config.name!r})"

    async def call(self, arguments: dict) -> ToolResult:
        import httpx2

        config = self.config
        try:
            async with asyncio.timeout(config.timeout_s):
                headers = await asyncio.to_thread(secret_headers, config.headers_from_secret)
                async with httpx2.AsyncClient(timeout=config.timeout_s, trust_env=False) as http:
                    response = await http.post(config.url, json=arguments, headers=headers)
                    body = await response.aread()
        except ToolError as error:
            return _failed(error.outcome, str(error))
        except TimeoutError:
            return _failed("timeout", f"the webhook did not answer within {config.timeout_s:g} s")
        except Exception as error:
            return _failed("error", f"the webhook cannot be reached: {_describe(error)}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _failed("invalid_output", "the webhook's response is not UTF-8 text")
        if not response.is_success:
            detail = text.strip()[:200]
            return _failed("error", f"the webhook answered HTTP {response.status_code}" + (f": {detail}" if detail else ""))
        if "json" in response.headers.get("content-type", ""):
            try:
                json.loads(text)
            except ValueError:
                return _failed("invalid_output", "the webhook's response says it is JSON but is not")
        try:
            return ToolResult(_checked_output(text))
        except ToolError as error:
            return _failed(error.outcome, str(error))


# -- one request's tools -----------------------------------------------------------------------------

@dataclass
class ServerTool:
    """A server-side tool as one request offers it to the model."""
    name: str                     # the function name in the prompt
    description: str | None
    parameters: dict
    server_label: str             # WEBHOOK_LABEL for webhooks
    tool_name: str                # its name at the server
    handler: McpServer | Webhook
    configured: bool = True       # from the config (False: a request named its server)

    def definition(self) -> dict:
        """As a chat completion's `tools` entry."""
        function = {"name": self.name, **({"description": self.description} if self.description else {}),
                    "parameters": self.parameters}                  # a client's function tool's key order
        return {"type": "function", "function": function}

    async def call(self, arguments: str) -> ToolResult:
        try:
            parsed = parse_arguments(arguments, self.parameters)
        except ToolError as error:
            return _failed(error.outcome, str(error))
        if isinstance(self.handler, Webhook):
            return await self.handler.call(parsed)
        return await self.handler.call(self.tool_name, parsed)


@dataclass
class Listing:
    """One MCP server's listing for a request: its tools, or why there are none."""
    server_label: str
    tools: list[McpTool] = field(default_factory=list)
    error: str | None = None
    configured: bool = True


def _function_name(name: str) -> str:
    """An MCP tool's name as a function name every chat format carries."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)[:64] or "tool"


@dataclass
class ToolSet:
    """The server-side tools of one request, by the function name the model calls them with."""
    tools: dict[str, ServerTool] = field(default_factory=dict)
    listings: list[Listing] = field(default_factory=list)
    max_steps: int = 8
    on_call: Callable[[ServerTool, ToolResult, float], None] | None = None     # metrics: (tool, result, seconds)

    def __bool__(self) -> bool:
        return bool(self.tools or self.listings)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def definitions(self) -> list[dict]:
        return [tool.definition() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str) -> ToolResult:
        """Run one call; never raises (a failure is a ToolResult with an error)."""
        tool = self.tools[name]
        started = time.monotonic()
        try:
            result = await tool.call(arguments)
        except asyncio.CancelledError:
            raise
        except Exception as error:      # a bug here must not fail the request either; it is logged
            log.exception("server-side tool %r failed unexpectedly", name)
            result = _failed("error", f"the tool failed: {_describe(error)}")
        if self.on_call is not None:
            try:
                self.on_call(tool, result, time.monotonic() - started)
            except Exception:
                log.exception("recording a tool call's metrics failed")
        return result


@dataclass(frozen=True)
class RequestMcpServer:
    """An MCP server a Responses API request names itself (`{"type": "mcp", ...}`)."""
    server_label: str
    server_url: str
    allowed_tools: tuple[str, ...] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    where: str = "tools"          # the request parameter, for errors


def _host_port(entry: str) -> tuple[str, str | None]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest.removeprefix(":") or None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, None


def host_allowed(url: str, allowed_hosts: list[str]) -> bool:
    """Whether `url`'s host is on the allow-list ('host' for any port, 'host:port' for one)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return False
    port = str(parts.port or (443 if parts.scheme == "https" else 80))
    for entry in allowed_hosts:
        name, entry_port = _host_port(entry.lower())
        if name == host and entry_port in (None, port):
            return True
    return False


class ToolRegistry:
    """The server-side tools of every tenant of one ingress replica: their MCP servers (with the
    listings cached) and webhooks, and the request-supplied MCP servers seen lately.
    `sections` maps a tenant's name to its ToolsSection; others get `default`."""

    def __init__(self, default: ToolsSection, sections: dict[str, ToolsSection] | None = None,
                 on_call: Callable[[str, ServerTool, ToolResult, float], None] | None = None):
        self.default, self.sections = default, dict(sections or {})
        self.on_call = on_call
        self._servers: dict[tuple[str, str], McpServer] = {}          # (tenant, label) -> server
        self._request_servers: OrderedDict[RequestMcpServer, McpServer] = OrderedDict()

    @classmethod
    def from_config(cls, config: ClusterConfig, on_call=None) -> "ToolRegistry":
        sections = {name: spec.tools for name, spec in config.tenants.items()
                    if getattr(spec, "tools", None) is not None}
        return cls(config.tools, sections, on_call)

    def section(self, tenant: str) -> ToolsSection:
        return self.sections.get(tenant, self.default)

    def check_request_servers(self, tenant: str, servers: list[RequestMcpServer]) -> None:
        """A 400 naming the first request-supplied MCP server the tenant may not use."""
        section = self.section(tenant)
        labels = {s.server_label for s in section.mcp_servers} | {WEBHOOK_LABEL}
        for server in servers:
            if not host_allowed(server.server_url, section.allowed_mcp_hosts):
                host = urlsplit(server.server_url).netloc or server.server_url
                allowed = ", ".join(section.allowed_mcp_hosts) or "none"
                raise APIError(400, f"{server.where}: the MCP server URL's host {host!r} is not allowed for "
                                    f"this tenant (allowed_mcp_hosts: {allowed})", param="tools",
                               code="mcp_server_not_allowed")
            if server.server_label in labels:
                raise APIError(400, f"{server.where}: server_label {server.server_label!r} is taken (by a "
                                    "configured server, another tool of this request, or the webhooks)", param="tools")
            labels.add(server.server_label)

    async def resolve(self, tenant: str, request_servers: list[RequestMcpServer] = (),
                      reserved_names: set[str] = frozenset()) -> ToolSet:
        """The tools of one request of `tenant`: its webhooks, and the tools every MCP server (its
        own and the request's) lists, listed concurrently. `reserved_names` (the request's own
        function tools) may not be taken: a configured tool of the same name is a 400."""
        section = self.section(tenant)
        self.check_request_servers(tenant, list(request_servers))
        servers = [(self._configured(tenant, c, section), True) for c in section.mcp_servers]
        servers += [(self._requested(r, section), False) for r in request_servers]
        if not servers and not section.webhooks:
            return ToolSet(max_steps=section.max_tool_steps)
        listed = await asyncio.gather(*(self._list(server, configured) for server, configured in servers))

        tools: dict[str, ServerTool] = {}
        for webhook in section.webhooks:
            if webhook.name in reserved_names:
                raise _name_taken(webhook.name, "a webhook")
            tools[webhook.name] = ServerTool(webhook.name, webhook.description or None, webhook.parameters,
                                             WEBHOOK_LABEL, webhook.name, Webhook(webhook))
        for (server, configured), listing in zip(servers, listed):
            for tool in listing.tools:
                name = _function_name(tool.name)
                if name in reserved_names:
                    raise _name_taken(name, f"a tool of the MCP server {server.label!r}")
                if name in tools:               # two servers' tools of one name: the later one is qualified
                    name = _function_name(f"{server.label}__{tool.name}")
                if name in tools or name in reserved_names:
                    log.warning("MCP server %r: tool %r is left out: its name is taken", server.label, tool.name)
                    continue
                tools[name] = ServerTool(name, tool.description, tool.input_schema, server.label, tool.name,
                                         server, configured)
        on_call = None
        if self.on_call is not None:
            on_call = lambda tool, result, seconds: self.on_call(tenant, tool, result, seconds)  # noqa: E731
        return ToolSet(tools, listed, section.max_tool_steps, on_call)

    def _configured(self, tenant: str, config: McpServerConfig, section: ToolsSection) -> McpServer:
        key = (tenant if tenant in self.sections else "", config.server_label)
        if key not in self._servers:
            self._servers[key] = McpServer.from_config(config, section.list_cache_s)
        return self._servers[key]

    def _requested(self, request: RequestMcpServer, section: ToolsSection) -> McpServer:
        server = self._request_servers.pop(request, None) or McpServer(
            request.server_label, request.server_url, allowed_tools=request.allowed_tools,
            headers=dict(request.headers), cache_s=section.list_cache_s)
        self._request_servers[request] = server                       # most recently used last
        while len(self._request_servers) > REQUEST_SERVERS_CACHED:
            self._request_servers.popitem(last=False)
        return server

    @staticmethod
    async def _list(server: McpServer, configured: bool) -> Listing:
        try:
            return Listing(server.label, await server.tools(), configured=configured)
        except ToolError as error:
            log.warning("%s", error)
            return Listing(server.label, [], str(error), configured)


def _name_taken(name: str, what: str) -> APIError:
    return APIError(400, f"the function tool {name!r} has the name of {what} that this service runs for the "
                         "tenant; rename the function", param="tools")

