"""The server-side tool loop: one chat choice whose model may call tools the service runs.

    start: step 1 = Ingress.start_chat(the request, its tools + the server-side tools)
    events: stream the step's output: text and the client's calls pass through, a call of a
            server-side tool is announced (CallStarted)
            -> the step ends without a server-side call: done (the client's calls go back to it)
            -> max_tool_steps rounds already ran: done, the calls are not run ("max_tool_steps")
            -> run the step's server-side calls concurrently (CallDone as each ends)
            -> append the assistant message (its calls) and one tool message per result, as the
               chat template expects them -> the client's calls too? done ("tool_calls")
            -> next step: the same request, its messages grown, tool_choice "auto" after a named
               one ("required" stays: every step calls; the step limit ends it), the remaining
               max_tokens

Chat completions (`chat_completion` below) and the Responses API (deployments/responses.py, with
`ResponsesMcp` for its mcp_call and mcp_list_tools items) consume the same events. A tool that
fails is a result with an error the model reads; the request goes on.

Chat completions extension (docs/server-tools.md): the message gets `server_tool_calls`, each
`{"id", "type": "function", "function": {"name", "arguments"}, "server_label", "status",
"output", "error"}`; streamed, a call appears as a `server_tool_calls` delta when the model has
made it (status "in_progress") and again when it has run ("completed" or "failed", with the
output or the error). finish_reason "max_tool_steps" says the step limit ended the request.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.config import SERVER_LABEL
from deployments.protocol import ChatCompletionRequest, Tool
from deployments.server_tools import Listing, RequestMcpServer, ServerTool, ToolResult, ToolSet
from models.chat_output import Event
from router.engine import RequestOutput

MAX_TOOL_STEPS = "max_tool_steps"           # the finish reason (and incomplete reason) of the step limit


# -- what a loop produces ------------------------------------------------------------------------------

@dataclass
class ServerCall:
    """A call of a server-side tool, from the model's call to its result."""
    id: str                                   # the chat call id (call_...)
    name: str                                 # the function name the model used
    arguments: str
    tool: ServerTool
    result: ToolResult | None = None
    run: bool = True                          # False: the step limit stopped it before it ran

    @property
    def status(self) -> str:
        if not self.run:
            return "incomplete"
        if self.result is None:
            return "in_progress"
        return "completed" if self.result.ok else "failed"

    def as_chat(self) -> dict:
        """As a `server_tool_calls` entry of a chat completion (docs/server-tools.md)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments},
                "server_label": self.tool.server_label, "status": self.status,
                "output": self.result.output if self.result else None,
                "error": self.result.error if self.result else None}


@dataclass
class Generated:
    """One router output of the current step: its parsed events, less the server-side calls."""
    output: RequestOutput
    events: list[Event]


@dataclass
class CallStarted:
    call: ServerCall


@dataclass
class CallDone:
    call: ServerCall


@dataclass
class LoopChoice:
    """A choice across all its steps: what `_Choice` is for one (the consumers read the same names)."""
    index: int = 0
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)       # the client's calls
    server_calls: list[ServerCall] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0                                     # every step's prompt
    first_prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def chat_finish_reason(self) -> str | None:
        if self.finish_reason == "stop" and self.tool_calls:
            return "tool_calls"
        return self.finish_reason

    def add_step(self, step) -> None:
        """Count a finished step's tokens (`step` is the ingress's per-step _Choice)."""
        if not self.first_prompt_tokens:
            self.first_prompt_tokens = step.prompt_tokens
        self.prompt_tokens += step.prompt_tokens
        self.completion_tokens += step.completion_tokens
        self.cached_tokens += step.cached_tokens


# -- the loop -------------------------------------------------------------------------------------------

class ToolLoop:
    """One choice of a chat request run to its end through its server-side tools. `ingress` is the
    Ingress deployment (its chat core: start_chat, _outputs)."""

    def __init__(self, ingress, body: ChatCompletionRequest, tenant, tools: ToolSet, request_id: str, *,
                 session: str | None = None, index: int = 0):
        self.ingress, self.tenant, self.tools = ingress, tenant, tools
        self.request_id, self.index = request_id, index
        self.session = session or body.prompt_cache_key or request_id    # every step on the conversation's replica
        self.body = self._with_server_tools(body)
        self.messages = list(self.body.messages)
        self.budget = body.max_completion_tokens or body.max_tokens        # None: the context's room, per step
        self.choice = LoopChoice(index)
        self.steps = 0                    # rounds of server-side calls run
        self._run = None

    def _with_server_tools(self, body: ChatCompletionRequest) -> ChatCompletionRequest:
        present = {t.function.name for t in body.tools or []}
        extra = [Tool.model_validate(d) for d in self.tools.definitions() if d["function"]["name"] not in present]
        update: dict[str, Any] = {"tools": [*(body.tools or []), *extra] or None, "n": 1}
        if body.seed is not None:
            update["seed"] = body.seed + self.index
        return body.model_copy(update=update)

    async def start(self) -> "ToolLoop":
        """Start the first step; an APIError here is the request's HTTP status."""
        self._run = await self.ingress.start_chat(self.body, self.tenant, request_id=self.request_id,
                                                  session=self.session)
        return self

    async def events(self) -> AsyncIterator[Generated | CallStarted | CallDone]:
        """Every step's outputs and the server-side calls, until the choice is finished
        (`self.choice.finish_reason`). A failure of the router is raised (an APIError)."""
        while True:
            step, step_calls = self._run.choices[0], []
            async for _, output in self.ingress._outputs(self._run.streams):
                before = len(step.tool_calls)
                events = step.add(output)
                passed, started = [], []
                new_calls = iter(step.tool_calls[before:])
                for event in events:
                    if event.kind != "tool_call":
                        (self.choice.reasoning if event.kind == "reasoning" else self.choice.content).append(event.text)
                        passed.append(event)
                        continue
                    call = next(new_calls)
                    name = call["function"]["name"]
                    if name in self.tools:
                        started.append(ServerCall(call["id"], name, call["function"]["arguments"], self.tools.tools[name]))
                    else:
                        self.choice.tool_calls.append(call)
                        passed.append(event)
                self.choice.logprobs += output.logprobs or []
                yield Generated(output, passed)
                for server_call in started:
                    step_calls.append(server_call)
                    self.choice.server_calls.append(server_call)
                    yield CallStarted(server_call)
            self.choice.add_step(step)

            if not step_calls:
                self.choice.finish_reason = step.finish_reason
                return
            if self.steps >= self.tools.max_steps:
                for server_call in step_calls:
                    server_call.run = False
                self.choice.finish_reason = MAX_TOOL_STEPS
                return
            async for done in self._call_all(step_calls):
                yield done
            self.steps += 1
            self._append(step, step_calls)
            if self.choice.tool_calls:            # the client's calls: it answers them, then the model goes on
                self.choice.finish_reason = "stop"
                return
            if step.finish_reason == "length" or \
                    self.budget is not None and self.budget - self.choice.completion_tokens <= 0:
                self.choice.finish_reason = "length"      # no room left to answer the results in
                return
            await self._next_step()

    async def _call_all(self, calls: list[ServerCall]) -> AsyncIterator[CallDone]:
        """Run the calls concurrently; each is reported as it ends. Leaving early cancels the rest."""
        async def run(call: ServerCall) -> ServerCall:
            call.result = await self.tools.call(call.name, call.arguments)
            return call

        tasks = [asyncio.create_task(run(call)) for call in calls]
        try:
            for finished in asyncio.as_completed(tasks):
                yield CallDone(await finished)
        finally:
            for task in tasks:
                task.cancel()

    def _append(self, step, calls: list[ServerCall]) -> None:
        """The step as the conversation continues it: the assistant's message with every call it made,
        then the server-side results (the client's come with its next request)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(step.content) or None,
                                   "tool_calls": step.tool_calls}
        if step.reasoning:
            message["reasoning_content"] = "".join(step.reasoning)
        self.messages.append(message)
        self.messages += [{"role": "tool", "tool_call_id": call.id, "content": call.result.for_model}
                          for call in calls]

    async def _next_step(self) -> None:
        body = self.body
        update: dict[str, Any] = {"messages": self.messages}
        if body.tool_choice is not None and not isinstance(body.tool_choice, str):
            update["tool_choice"] = "auto"        # a named call was made; now the model answers (or calls again)
        if self.budget is not None:
            update.update(max_tokens=None, max_completion_tokens=self.budget - self.choice.completion_tokens)
        if body.seed is not None:
            update["seed"] = body.seed + 1000 * self.steps
        self._run = await self.ingress.start_chat(body.model_copy(update=update), self.tenant,
                                                  request_id=f"{self.request_id}-step{self.steps}",
                                                  session=self.session)

    def close(self) -> None:
        """Give back the router streams of a loop whose events are never read (its client left first)."""
        if self._run is not None:
            for stream, _ in self._run.streams:
                stream.cancel()


async def start_loops(ingress, body: ChatCompletionRequest, tenant, tools: ToolSet, request_id: str,
                      session: str | None = None) -> list[ToolLoop]:
    """One started loop per choice (n); if one cannot start, those started are given back."""
    loops: list[ToolLoop] = []
    try:
        for i in range(body.n):
            loops.append(await ToolLoop(ingress, body, tenant, tools, request_id if body.n == 1 else
                                        f"{request_id}-{i}", session=session or request_id, index=i).start())
    except BaseException:
        for loop in loops:
            loop.close()
        raise
    return loops


# -- chat completions -------------------------------------------------------------------------------------

def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(loops: list[ToolLoop]) -> dict:
    """Every step's tokens; the prompt the choices share counts once."""
    choices = [loop.choice for loop in loops]
    prompt = choices[0].first_prompt_tokens + sum(c.prompt_tokens - c.first_prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": max(c.cached_tokens for c in choices)}}


async def chat_completion(ingress, body: ChatCompletionRequest, tenant, tools: ToolSet):
    """/v1/chat/completions for a request with server-side tools: one JSON body, or SSE chunks."""
    from fastapi.responses import StreamingResponse

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    loops = await start_loops(ingress, body, tenant, tools, request_id)
    if body.stream:
        return StreamingResponse(_chunks(ingress, body, request_id, loops), media_type="text/event-stream")
    from deployments.ingress import _merge

    async for _ in _merge([loop.events() for loop in loops]):
        pass
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": ingress.model_id,
            "choices": [_chat_choice(ingress, body, loop.choice) for loop in loops], "usage": _usage(loops)}


def _chat_choice(ingress, body, c: LoopChoice) -> dict:
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(c.content) if c.content or not c.tool_calls else None}
    if c.reasoning:
        message["reasoning_content"] = "".join(c.reasoning)
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    message["server_tool_calls"] = [call.as_chat() for call in c.server_calls]
    return {"index": c.index, "message": message,
            "logprobs": {"content": ingress._chat_logprobs(c.logprobs)} if body.logprobs else None,
            "finish_reason": c.chat_finish_reason}


async def _chunks(ingress, body, request_id: str, loops: list[ToolLoop]) -> AsyncIterator[str]:
    from deployments.ingress import _merge, as_api_error

    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
        return _sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": ingress.model_id,
                     "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                     **({"usage": None} if include_usage else {})})

    for loop in loops:
        yield chunk(loop.index, {"role": "assistant", "content": ""})
    client_calls = [0] * len(loops)
    try:
        async for i, event in _merge([loop.events() for loop in loops]):
            choice = loops[i].choice
            if isinstance(event, Generated):
                logprobs = {"content": ingress._chat_logprobs(event.output.logprobs)} \
                    if body.logprobs and event.output.logprobs else None
                for parsed in event.events:
                    if parsed.kind == "tool_call":
                        k = client_calls[i]
                        client_calls[i] += 1
                        yield chunk(i, {"tool_calls": [{"index": k, **choice.tool_calls[k]}]})
                    elif parsed.text:
                        key = "reasoning_content" if parsed.kind == "reasoning" else "content"
                        yield chunk(i, {key: parsed.text}, logprobs)
                        logprobs = None
                if logprobs:
                    yield chunk(i, {}, logprobs)
            else:
                call = event.call
                entry = call.as_chat() if isinstance(event, CallStarted) else \
                    {k: v for k, v in call.as_chat().items() if k in ("id", "status", "output", "error")}
                yield chunk(i, {"server_tool_calls": [{"index": choice.server_calls.index(call), **entry}]})
        for loop in loops:
            for call in loop.choice.server_calls:
                if not call.run:                  # stopped by the step limit: never ran
                    yield chunk(loop.index, {"server_tool_calls": [{
                        "index": loop.choice.server_calls.index(call), "id": call.id, "status": call.status,
                        "output": None, "error": None}]})
            yield chunk(loop.index, {}, None, loop.choice.chat_finish_reason)
        if include_usage:
            yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                        "model": ingress.model_id, "choices": [], "usage": _usage(loops)})
    except Exception as error:                   # the status line is gone: report in the stream, as OpenAI does
        yield _sse(as_api_error(error).body())
    finally:
        for loop in loops:
            loop.close()
    yield _sse("[DONE]")


# -- the Responses API: mcp tools in the request, mcp_call and mcp_list_tools items --------------------------

class McpToolFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tool_names: list[str] | None = None
    read_only: bool | None = None

    @field_validator("read_only")
    @classmethod
    def _read_only(cls, value):
        if value:
            raise ValueError("allowed_tools.read_only is not supported; name the tools in tool_names")
        return value


class McpToolParam(BaseModel):
    """An MCP server a Responses API request names itself, as OpenAI's `{"type": "mcp", ...}` tool.
    The tenant's `tools.allowed_mcp_hosts` decides whether it may (ToolRegistry.check_request_servers)."""
    model_config = ConfigDict(extra="forbid")

    type: Literal["mcp"] = "mcp"
    server_label: str = Field(pattern=SERVER_LABEL)
    server_url: str
    allowed_tools: list[str] | McpToolFilter | None = None
    require_approval: Any = Field(None, validate_default=True)     # OpenAI's default is "always": refused
    headers: dict[str, str] | None = Field(None, exclude=True)     # credentials: never echoed nor stored
    server_description: str | None = None

    @field_validator("require_approval")
    @classmethod
    def _never(cls, value):
        if value != "never":
            raise ValueError(f"require_approval must be \"never\" (got {value!r}): this server runs MCP calls "
                             "without asking, and has no approval requests")
        return value

    def server(self, where: str) -> RequestMcpServer:
        allowed = self.allowed_tools.tool_names if isinstance(self.allowed_tools, McpToolFilter) else self.allowed_tools
        return RequestMcpServer(self.server_label, self.server_url, None if allowed is None else tuple(allowed),
                                tuple(sorted((self.headers or {}).items())), where)


def mcp_call_message(item: dict) -> tuple[dict, dict]:
    """A stored mcp_call item as the chat messages it was: the assistant's call and the tool's answer."""
    call = {"id": item["id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
    output = item["output"] if item.get("error") is None else f"Error: {item['error']}"
    return call, {"role": "tool", "tool_call_id": item["id"], "content": output if output is not None else ""}


def listed_labels(items: list[dict]) -> set[str]:
    """The MCP servers an earlier turn's output already lists (OpenAI lists a server once per conversation)."""
    return {item["server_label"] for item in items if item["type"] == "mcp_list_tools" and not item.get("error")}


class ResponsesMcp:
    """The mcp_list_tools and mcp_call output items of one response and their stream events (type,
    fields), in OpenAI's shapes and order. `items` is the response's output list, shared with the
    text items' builder, which `close_open()` (the builder's `finish(False)`) closes first."""

    def __init__(self, items: list[dict], close_open):
        self.items, self.close_open = items, close_open
        self._by_call: dict[int, dict] = {}

    def listings(self, listings: list[Listing], already: set[str]) -> list[tuple[str, dict]]:
        out = []
        for listing in listings:
            if listing.server_label in already and listing.error is None:
                continue
            item = {"id": f"mcpl_{uuid.uuid4().hex}", "type": "mcp_list_tools", "server_label": listing.server_label,
                    "tools": [], "error": None}
            self.items.append(item)
            where = {"output_index": len(self.items) - 1, "item_id": item["id"]}
            out += [("response.output_item.added", {"output_index": where["output_index"], "item": dict(item)}),
                    ("response.mcp_list_tools.in_progress", where)]
            item.update(tools=[t.listing() for t in listing.tools], error=listing.error)
            out += [("response.mcp_list_tools.failed" if listing.error else "response.mcp_list_tools.completed", where),
                    ("response.output_item.done", {"output_index": where["output_index"], "item": item})]
        return out

    def event(self, event: CallStarted | CallDone) -> list[tuple[str, dict]]:
        call = event.call
        if isinstance(event, CallStarted):
            out = self.close_open()
            item = {"id": f"mcp_{uuid.uuid4().hex}", "type": "mcp_call", "server_label": call.tool.server_label,
                    "name": call.name, "arguments": "", "output": None, "error": None, "status": "in_progress",
                    "approval_request_id": None}
            self.items.append(item)
            self._by_call[id(call)] = item
            where = {"output_index": len(self.items) - 1, "item_id": item["id"]}
            item["arguments"] = call.arguments
            return out + [
                ("response.output_item.added", {"output_index": where["output_index"],
                                                "item": {**item, "arguments": ""}}),
                ("response.mcp_call_arguments.delta", {**where, "delta": call.arguments}),
                ("response.mcp_call_arguments.done", {**where, "arguments": call.arguments}),
                ("response.mcp_call.in_progress", where)]
        item = self._by_call[id(call)]
        where = {"output_index": self.items.index(item), "item_id": item["id"]}
        item.update(output=call.result.output, error=call.result.error, status=call.status)
        return [("response.mcp_call.completed" if call.result.ok else "response.mcp_call.failed", where),
                ("response.output_item.done", {"output_index": where["output_index"], "item": item})]

    def not_run(self, calls: list[ServerCall], max_steps: int) -> list[tuple[str, dict]]:
        """The calls the step limit stopped: failed items that say so."""
        out = []
        for call in calls:
            if call.run:
                continue
            item = self._by_call[id(call)]
            where = {"output_index": self.items.index(item), "item_id": item["id"]}
            item.update(status="incomplete", error=f"not run: this response reached max_tool_steps ({max_steps})")
            out += [("response.mcp_call.failed", where),
                    ("response.output_item.done", {"output_index": where["output_index"], "item": item})]
        return out
