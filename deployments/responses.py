"""OpenAI's Responses API (`/v1/responses`) over the ingress's chat core, with durable conversations.

One request, top to bottom (`Responses.create`):

    validate -> load the conversation `previous_response_id` continues (the caller's tenant's only)
    -> this turn's input items -> the server-side tools (the tenant's MCP servers and webhooks,
    the request's own `mcp` tools) -> fit the conversation into the context (sessions.context_policy:
    error | truncate | summarize) -> one ChatCompletionRequest -> a ToolLoop over
    Ingress.start_chat(session=the conversation id), which runs the server-side calls
    (deployments/tool_loop.py) -> output items (mcp_list_tools, reasoning, message, function_call,
    mcp_call) as the text streams -> store the turn (store: true) -> the response object, or the
    same as Responses stream events

A conversation is the chain of responses linked by previous_response_id; its id is the id of its
first response, which the router deployment's request router uses to keep a conversation on the
replica whose prefix cache holds it. Each turn is rebuilt from the stored items (earlier inputs,
outputs, tool calls and their outputs) and rendered with the model's own chat template.
Instructions apply to the request that gives them; they are not carried over (as OpenAI does).

When a conversation outgrows the context, `truncate` drops its oldest turns and `summarize` has the
model condense them into a short note that stands in for them; either keeps the instructions and
the latest turns, and records the cut with the response, so later turns start from it. The response
reports what happened in `context_management`:

    {"policy": "truncate" | "summarize", "turns_removed": 3, "tokens_removed": 812,
     "summary_tokens": 41, "summary": "..."}

(`tokens_removed`: prompt tokens the removed turns took; `summary_tokens`: the note's, added back;
`summary`: the note itself). It is null on a turn that shortened nothing.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.config import SessionsSection
from deployments.protocol import APIError, ChatCompletionRequest, validation_error
from deployments.store import SessionStore, StoreError, StoredResponse
from deployments.tenants import Tenant
from deployments.server_tools import ToolSet
from deployments.tool_loop import (MAX_TOOL_STEPS, Generated, McpToolParam, ResponsesMcp, ToolLoop, listed_labels,
                                   mcp_call_message)

SUMMARY_PREFIX = "Summary of the earlier conversation:\n"
SUMMARY_OVERHEAD_TOKENS = 16                # the prefix and message framing around a summary
SUMMARY_INSTRUCTIONS = (
    "You condense conversations. Summarize the conversation you are shown: the facts, names, numbers, "
    "decisions, tool results and open questions someone continuing it needs. Be brief; write only the summary.")

# Fields of OpenAI's Responses API this server does not serve, and why (unknown ones get a plain 400).
UNSUPPORTED = {
    "conversation": "the Conversations API is not served; continue a conversation with previous_response_id",
    "service_tier": "this server has one service tier",
    "prompt": "stored prompt templates are not served",
    "max_tool_calls": "server-side tool calls are bounded by the tenant's tools.max_tool_steps",
    "top_logprobs": "logprobs are not returned by the Responses API here; use /v1/chat/completions",
    "context_management": "conversations are shortened by the server's sessions.context_policy "
                          "(see truncation)",
}


# -- the request -------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionTool(_Body):
    type: Literal["function"] = "function"
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class ReasoningConfig(_Body):
    effort: Literal["none", "low", "medium", "high"] | None = None
    summary: None = None

    @field_validator("summary", mode="before")
    @classmethod
    def _summary(cls, value):
        if value is not None:
            raise ValueError("reasoning summaries are not written here; the model's reasoning comes back whole, "
                             "as the reasoning_text content of the reasoning item")
        return value


class ResponsesStreamOptions(_Body):
    include_obfuscation: bool | None = None     # events are never padded, so either value holds


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1)
    store: bool = True
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    tools: list[Annotated[FunctionTool | McpToolParam, Field(discriminator="type")]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    include: list[str] | None = None
    background: bool | None = None
    # extensions (vLLM's sampling fields, as on /v1/chat/completions)
    seed: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, raw):
        if isinstance(raw, dict):
            for name, why in UNSUPPORTED.items():
                if raw.get(name) is not None:
                    raise ValueError(f"{name} is not supported: {why}")
        return raw

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, tools):
        for i, tool in enumerate(tools or []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in ("function", "mcp"):
                raise ValueError(f"tools[{i}]: {kind!r} tools are not supported; function and mcp tools are")
            if kind == "function" and "function" in tool:
                raise ValueError(f"tools[{i}]: Responses function tools are flat ({{\"type\": \"function\", "
                                 "\"name\": ..., \"parameters\": ...}}), not nested under `function`")
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, choice):
        if isinstance(choice, dict) and choice.get("type") != "function":
            raise ValueError(f"tool_choice {choice.get('type')!r} is not supported; use none, auto, required "
                             "or {\"type\": \"function\", \"name\": ...}")
        return choice

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata):
        if metadata and (len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
            raise ValueError("at most 16 pairs, keys of at most 64 characters, values of at most 512")
        return metadata

    @field_validator("include")
    @classmethod
    def _include(cls, include):
        if include:
            raise ValueError(f"{include} cannot be included: reasoning comes back whole and unencrypted, "
                             "and logprobs are served by /v1/chat/completions")
        return include

    @field_validator("background")
    @classmethod
    def _background(cls, background):
        if background:
            raise ValueError("background responses are not supported; stream instead")
        return background


# -- items: the Responses API's conversation, and the chat messages it renders as ------------------

_ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
    "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"},
    # server-side tool calls and listings (deployments/tool_loop.py), sent back as they came
    "mcp_call": {"type", "id", "server_label", "name", "arguments", "output", "error", "status",
                 "approval_request_id"},
    "mcp_list_tools": {"type", "id", "server_label", "tools", "error"},
}
_PART_KEYS = {"type", "text", "annotations", "logprobs"}


def _text_parts(content: Any, where: str, allowed: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in allowed:
            raise APIError(400, f"{where}[{j}]: {kind!r} content is not supported; this model reads "
                                f"{' and '.join(allowed)} parts", param="input")
        if extra := set(part) - _PART_KEYS:
            raise APIError(400, f"{where}[{j}]: unknown parameters {sorted(extra)}", param="input")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}].text must be a string", param="input")
        texts.append(part["text"])
    return "".join(texts)


def input_items(value: str | list[dict]) -> list[dict]:
    """A request's `input` as the items this server stores: messages with one text part, function
    calls, function call outputs (text) and reasoning (its text), whatever shape the client sent."""
    if isinstance(value, str):
        return [_message_item("user", value)]
    items = []
    for i, raw in enumerate(value):
        where = f"input[{i}]"
        kind = raw.get("type", "message" if "role" in raw else None)
        if kind not in _ITEM_KEYS:
            raise APIError(400, f"{where}: {kind!r} items are not supported; input items are message, "
                                "function_call, function_call_output, reasoning, mcp_call and mcp_list_tools",
                           param="input")
        if extra := set(raw) - _ITEM_KEYS[kind]:
            raise APIError(400, f"{where}: unknown parameters {sorted(extra)} for a {kind} item", param="input")
        if kind == "message":
            role = raw.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant, got {role!r}",
                               param="input")
            allowed = ("output_text", "input_text") if role == "assistant" else ("input_text",)
            items.append(_message_item(role, _text_parts(raw.get("content"), f"{where}.content", allowed)))
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(raw.get(key), str) or (key != "arguments" and not raw[key]):
                    raise APIError(400, f"{where}.{key} must be a non-empty string", param="input")
            items.append({"type": "function_call", "call_id": raw["call_id"], "name": raw["name"],
                          "arguments": raw["arguments"]})
        elif kind == "function_call_output":
            if not isinstance(raw.get("call_id"), str) or not raw["call_id"]:
                raise APIError(400, f"{where}.call_id must name the function call it answers", param="input")
            output = _text_parts(raw.get("output"), f"{where}.output", ("input_text",))
            items.append({"type": "function_call_output", "call_id": raw["call_id"], "output": output})
        elif kind in ("mcp_call", "mcp_list_tools"):
            if not isinstance(raw.get("id"), str) or not isinstance(raw.get("server_label"), str):
                raise APIError(400, f"{where}: a {kind} item needs its id and server_label", param="input")
            if kind == "mcp_call" and not (isinstance(raw.get("name"), str) and isinstance(raw.get("arguments"), str)):
                raise APIError(400, f"{where}: an mcp_call item needs name and arguments strings", param="input")
            items.append({k: v for k, v in raw.items() if k != "approval_request_id"})
        else:
            if raw.get("encrypted_content"):
                raise APIError(400, f"{where}: encrypted reasoning is not supported (this server never "
                                    "encrypts it)", param="input")
            content = raw.get("content") or raw.get("summary") or []
            text = _text_parts(content, f"{where}.content", ("reasoning_text", "summary_text"))
            items.append(_reasoning_item(text))
    return items


def _message_item(role: str, text: str) -> dict:
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": part, "text": text}]}


def _reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _item_text(item: dict) -> str:
    return "".join(part.get("text", "") for part in item.get("content") or [])


def to_messages(items: list[dict]) -> list[dict]:
    """Items (stored inputs and outputs alike) as chat messages: consecutive reasoning, assistant
    text and function calls are one assistant message; a call's output is a tool message."""
    messages: list[dict] = []
    assistant: dict | None = None
    answers: list[dict] = []          # server-side results, after the assistant message that made the calls

    def open_assistant(starts_new: bool) -> dict:
        nonlocal assistant
        if assistant is None or starts_new:
            assistant = {"role": "assistant", "content": None}
            messages.append(assistant)
        return assistant

    for item in items:
        kind = item["type"]
        if answers and kind not in ("mcp_call", "function_call", "mcp_list_tools"):
            messages.extend(answers)
            answers, assistant = [], None
        if kind == "mcp_list_tools":
            continue
        if kind == "mcp_call":
            call, answer = mcp_call_message(item)
            open_assistant(False).setdefault("tool_calls", []).append(call)
            answers.append(answer)
        elif kind == "reasoning":
            message = open_assistant(assistant is not None and bool(assistant.get("content") or
                                                                    assistant.get("tool_calls")))
            message["reasoning_content"] = (message.get("reasoning_content") or "") + _item_text(item)
        elif kind == "message" and item["role"] == "assistant":
            message = open_assistant(assistant is not None and bool(assistant.get("tool_calls")))
            message["content"] = (message["content"] or "") + _item_text(item)
        elif kind == "function_call":
            open_assistant(False).setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            assistant = None
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        else:
            assistant = None
            messages.append({"role": item["role"], "content": _item_text(item)})
    messages.extend(answers)
    for message in messages:
        if message["role"] == "assistant" and message["content"] is None and not message.get("tool_calls"):
            message["content"] = ""                      # reasoning only: templates want some content
    return messages


def transcript(items: list[dict]) -> str:
    """A turn as plain text, for the model to summarize."""
    lines = []
    for item in items:
        if item["type"] == "message":
            lines.append(f"{item['role'].capitalize()}: {_item_text(item)}")
        elif item["type"] == "function_call":
            lines.append(f"Assistant called {item['name']}({item['arguments']})")
        elif item["type"] == "function_call_output":
            lines.append(f"Result of that call: {item['output']}")
        elif item["type"] == "mcp_call":
            lines.append(f"Assistant called {item['name']}({item['arguments']}): "
                         f"{item['output'] if item.get('error') is None else 'error: ' + item['error']}")
    return "\n".join(lines)


# -- output: parser events -> output items and stream events -------------------------------------------

def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Output:
    """The output items of one response as the model's text streams in, and the stream events that
    build them (type, fields) in OpenAI's order: item added, content part added, deltas, done."""

    def __init__(self):
        self.items: list[dict] = []
        self._open: dict | None = None           # the reasoning or message item still growing
        self._text: list[str] = []

    def feed(self, events, choice) -> list[tuple[str, dict]]:
        out, calls = [], len(choice.tool_calls) - sum(e.kind == "tool_call" for e in events)
        for event in events:
            if event.kind == "tool_call":
                out += self._close("completed")
                out += self._call(choice.tool_calls[calls])
                calls += 1
            elif event.text:
                kind = "reasoning" if event.kind == "reasoning" else "message"
                if self._open is None or self._open["type"] != kind:
                    out += self._close("completed")
                    out += self._start(kind)
                self._text.append(event.text)
                delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                out.append((delta, {**self._where(), "delta": event.text,
                                    **({"logprobs": []} if kind == "message" else {})}))
        return out

    def finish(self, incomplete: bool) -> list[tuple[str, dict]]:
        return self._close("incomplete" if incomplete else "completed")

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1, "content_index": 0}

    def _start(self, kind: str) -> list[tuple[str, dict]]:
        if kind == "reasoning":
            item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        self._open, self._text = item, []
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(item)}),
                ("response.content_part.added", {**self._where(), "part": part})]

    def _close(self, status: str) -> list[tuple[str, dict]]:
        item = self._open
        if item is None:
            return []
        text, where = "".join(self._text), self._where()
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = ("response.reasoning_text.done", {**where, "text": text})
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = ("response.output_text.done", {**where, "text": text, "logprobs": []})
        item.update(content=[part], status=status)
        self._open = None
        return [done, ("response.content_part.done", {**where, "part": part}),
                ("response.output_item.done", {"output_index": where["output_index"], "item": item})]

    def _call(self, call: dict) -> list[tuple[str, dict]]:
        arguments = call["function"]["arguments"]
        item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": ""}
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        added = ("response.output_item.added", {"output_index": where["output_index"], "item": dict(item)})
        item.update(arguments=arguments, status="completed")
        return [added, ("response.function_call_arguments.delta", {**where, "delta": arguments}),
                ("response.function_call_arguments.done", {**where, "arguments": arguments, "name": item["name"]}),
                ("response.output_item.done", {"output_index": where["output_index"], "item": item})]


# -- the API ---------------------------------------------------------------------------------------------

@dataclass
class _Fitted:
    """This turn's chat request, and what fitting it into the context did to the conversation."""
    body: ChatCompletionRequest
    context_management: dict | None = None
    summary: str | None = None
    dropped_through: str | None = None


@dataclass
class _Turn:
    """What a response being generated needs until it is stored."""
    request: ResponsesRequest
    tenant: Tenant
    id: str
    conversation_id: str
    created_at: int
    input: list[dict]
    fitted: _Fitted
    head: dict = field(default_factory=dict)      # the response object's fields that do not change
    tools: ToolSet = field(default_factory=ToolSet)   # server-side tools (deployments/tool_loop.py)
    listed: set[str] = field(default_factory=set)     # MCP servers an earlier turn listed already


class Responses:
    """The Responses API of one ingress replica. `ingress` is the Ingress deployment (its chat core:
    `start_chat`, `_outputs`, `router_info`, `chat`, `tokenizer`); `store` keeps the responses."""

    def __init__(self, ingress, store: SessionStore, config: SessionsSection):
        self.ingress = ingress
        self.store = store
        self.config = config

    # -- endpoints --

    async def create(self, request: ResponsesRequest, tenant: Tenant) -> dict | AsyncIterator[str]:
        """The response object, or (stream: true) its SSE events. Anything wrong before the model
        starts is an APIError, so the client gets an HTTP status."""
        self.ingress._check_model(request.model)
        conversation = None
        if request.previous_response_id:
            conversation = await self._stored(self.store.conversation(tenant.name, request.previous_response_id))
            if conversation is None:
                raise APIError(404, f"Response with id '{request.previous_response_id}' not found.",
                               param="previous_response_id")
            if conversation.missing:
                raise APIError(400, f"Response '{conversation.missing}', an earlier turn of the conversation "
                                    f"'{request.previous_response_id}' continues, was deleted; the conversation "
                                    "cannot be continued", param="previous_response_id")
        current = input_items(request.input)
        if not current:
            raise APIError(400, "input is empty", param="input")
        response_id = _new_id("resp")
        conversation_id = conversation.id if conversation else response_id
        info = await self.ingress.router_info()
        context = self.ingress.context_tokens(tenant, info)          # the model's, or the tenant's limit
        whose = "This model's maximum context length" if context == info["max_model_len"] else \
            f"Tenant {tenant.name!r}'s maximum context length (max_context_tokens)"
        tools = await self._server_tools(request, tenant)
        try:
            fitted = await self._fit(request, conversation, current, (context, whose), tenant, response_id,
                                     conversation_id, server_tools=tools.definitions())
        except APIError as error:
            if error.code == "context_length_exceeded" and context < info["max_model_len"]:
                self.ingress.limits.rejected(tenant, "max_context_tokens")     # counted as the chat path does
            raise
        turn = _Turn(request, tenant, response_id, conversation_id, int(time.time()), current, fitted)
        turn.head = self._head(turn)
        turn.tools = tools
        turn.listed = listed_labels([item for t in conversation.turns for item in t.output] if conversation else [])
        # The model's calls of server-side tools are run and answered in this response (tool_loop.py).
        run = await ToolLoop(self.ingress, fitted.body, tenant, tools, response_id, session=conversation_id).start()
        events = self._events(turn, run)
        if request.stream:
            return self._sse(events)
        async for kind, fields in events:
            if kind == "error":
                raise fields["_error"]
        return fields["response"]

    async def retrieve(self, response_id: str, tenant: Tenant, query: dict) -> dict:
        if query:
            raise APIError(400, f"unsupported query parameters {sorted(query)}: a stored response is returned "
                                "whole, and cannot be streamed again")
        record = await self._stored(self.store.get(tenant.name, response_id))
        if record is None:
            raise APIError(404, f"Response with id '{response_id}' not found.")
        return record.as_response()

    async def delete(self, response_id: str, tenant: Tenant) -> dict:
        if not await self._stored(self.store.delete(tenant.name, response_id)):
            raise APIError(404, f"Response with id '{response_id}' not found.")
        return {"id": response_id, "object": "response", "deleted": True}

    # -- fitting the conversation into the context --

    def _policy(self, request: ResponsesRequest) -> str:
        if request.truncation == "disabled":
            return "error"
        if request.truncation == "auto" and self.config.context_policy == "error":
            return "truncate"
        return self.config.context_policy

    async def _fit(self, request, conversation, current, limit, tenant, response_id, conversation_id, *,
                   server_tools: list[dict] = ()) -> _Fitted:
        turns = [t.input + t.output for t in conversation.turns] if conversation else []
        ids = [t.id for t in conversation.turns] if conversation else []
        summary = conversation.summary if conversation else None
        messages = self._messages(request.instructions, summary, turns, current)
        body = self._chat_body(request, messages, server_tools)
        tokens = await self._count(body, messages)
        budget = limit[0] - (request.max_output_tokens or self.config.reserved_output_tokens)
        policy = self._policy(request)
        if tokens <= budget or policy == "error" or not turns:
            self._check_fits(tokens, request.max_output_tokens, limit)
            return _Fitted(body)
        # Keep the latest turns that fit, at most keep_turns; the current turn always stays.
        room_for_summary = self.config.summary_max_tokens + SUMMARY_OVERHEAD_TOKENS if policy == "summarize" else 0
        for keep in range(min(self.config.keep_turns, len(turns)), -1, -1):
            kept = self._messages(request.instructions, None, turns[len(turns) - keep:], current)
            kept_tokens = await self._count(body, kept)
            if kept_tokens + room_for_summary <= budget:
                break
        else:
            # Not even a summary fits beside the current turn: every earlier turn goes (or a 400).
            self._check_fits(kept_tokens, request.max_output_tokens, limit)
            return _Fitted(body.model_copy(update={"messages": kept}),
                           self._report("truncate", len(turns), tokens - kept_tokens), None, ids[-1])
        dropped = len(turns) - keep
        report = self._report(policy, dropped, tokens - kept_tokens)
        new_summary = None
        if policy == "summarize":
            new_summary = await self._summarize(summary, turns[:dropped], tenant, response_id, conversation_id)
            kept = self._messages(request.instructions, new_summary, turns[dropped:], current)
            with_summary = await self._count(body, kept)
            report.update(summary_tokens=with_summary - kept_tokens, summary=new_summary)
            kept_tokens = with_summary
        self._check_fits(kept_tokens, request.max_output_tokens, limit)
        return _Fitted(body.model_copy(update={"messages": kept}), report, new_summary, ids[dropped - 1])

    @staticmethod
    def _report(policy: str, turns: int, tokens: int) -> dict:
        return {"policy": policy, "turns_removed": turns, "tokens_removed": tokens, "summary_tokens": None}

    @staticmethod
    def _messages(instructions: str | None, summary: str | None, turns: list[list[dict]], current: list[dict]
                  ) -> list[dict]:
        head = [text for text in (instructions, summary and SUMMARY_PREFIX + summary) if text]
        system = [{"role": "system", "content": "\n\n".join(head)}] if head else []
        return system + to_messages([item for turn in turns for item in turn] + current)

    async def _count(self, body: ChatCompletionRequest, messages: list[dict]) -> int:
        rendered = await asyncio.to_thread(self.ingress.chat.render, body, messages)
        return len(rendered.token_ids)

    @staticmethod
    def _check_fits(tokens: int, requested: int | None, limit: tuple[int, str]) -> None:
        """A 400 with both token counts unless the input and the output fit `limit` (tokens, whose)."""
        context, whose = limit
        if tokens + (requested or 1) <= context:
            return
        asked = f"max_output_tokens asks for {requested} more" if requested else "that leaves no room for output"
        raise APIError(400, f"{whose} is {context} tokens. However, this turn's "
                            f"input (the conversation so far and the new input) is {tokens} tokens, and {asked}. "
                            "Shorten the input or max_output_tokens, or continue with truncation: \"auto\".",
                       param="input", code="context_length_exceeded")

    async def _summarize(self, earlier: str | None, turns: list[list[dict]], tenant: Tenant, response_id: str,
                         conversation_id: str) -> str:
        """The model's own note on `turns` (and the summary before them): a real generation through
        the router, greedy, at most summary_max_tokens; the oldest turns go first if even they do not fit."""
        shown = [{"role": "user", "content": SUMMARY_PREFIX + earlier}] if earlier else []
        shown += [{"role": "user", "content": transcript(turn)} for turn in turns]
        messages = [{"role": "system", "content": SUMMARY_INSTRUCTIONS}, *shown,
                    {"role": "user", "content": "Now write the summary of the conversation above."}]
        body = ChatCompletionRequest(
            model=self.ingress.model_id, messages=messages, max_tokens=self.config.summary_max_tokens,
            temperature=0, truncation="auto",
            chat_template_kwargs={"enable_thinking": False} if self.ingress.chat.hybrid_thinking else None)
        run = await self.ingress.start_chat(body, tenant, request_id=f"{response_id}-summary", session=conversation_id)
        choice = run.choices[0]
        async for _, output in self.ingress._outputs(run.streams):
            choice.add(output)
        return ("".join(choice.content) or "".join(choice.reasoning)).strip()

    # -- the chat request --

    async def _server_tools(self, request: ResponsesRequest, tenant: Tenant) -> ToolSet:
        """The tenant's server-side tools and those of the MCP servers the request names (a 400 for a
        host the tenant does not allow); none when tool_choice is none and the request names none."""
        servers = [t.server(f"tools[{i}]") for i, t in enumerate(request.tools or []) if t.type == "mcp"]
        if request.tool_choice == "none" and not servers:
            return ToolSet()
        functions = {t.name for t in request.tools or [] if t.type == "function"}
        return await self.ingress.server_tools.resolve(tenant.name, servers, reserved_names=functions)

    def _chat_body(self, request: ResponsesRequest, messages: list[dict], server_tools: list[dict] = ()
                   ) -> ChatCompletionRequest:
        kwargs = dict(request.chat_template_kwargs or {})
        effort = request.reasoning.effort if request.reasoning else None
        if effort == "none":
            if self.ingress.chat.harmony:
                raise APIError(400, "reasoning.effort none: this model always reasons (use low)", param="reasoning")
            if self.ingress.chat.hybrid_thinking:
                kwargs["enable_thinking"] = False
            effort = None
        fmt = request.text.format if request.text else None
        response_format = None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise APIError(400, "text.format json_schema needs a schema", param="text")
            response_format = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema_, "description": fmt.description,
                "strict": fmt.strict}}
        elif fmt is not None:
            response_format = {"type": fmt.type}
        choice = request.tool_choice
        raw = {
            "model": request.model, "messages": messages, "max_completion_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed, "stop": request.stop,
            "top_k": request.top_k, "min_p": request.min_p, "repetition_penalty": request.repetition_penalty,
            "min_tokens": request.min_tokens, "ignore_eos": request.ignore_eos, "user": request.user,
            "tools": [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                      for t in request.tools or [] if t.type == "function"] + list(server_tools) or None,
            "tool_choice": {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, FunctionChoice) else choice,
            "parallel_tool_calls": request.parallel_tool_calls, "response_format": response_format,
            "reasoning_effort": effort, "chat_template_kwargs": kwargs or None,
            "thinking_token_budget": request.thinking_token_budget,
        }
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in raw.items() if v is not None})
        except ValidationError as error:
            raise validation_error(error) from None

    # -- the response --

    def _head(self, turn: _Turn) -> dict:
        request, defaults = turn.request, self.ingress.defaults
        fmt = request.text.format if request.text and request.text.format else None
        return {
            "id": turn.id, "object": "response", "created_at": turn.created_at, "status": "in_progress",
            "completed_at": None, "error": None, "incomplete_details": None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "model": self.ingress.model_id, "output": [], "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": request.reasoning.effort if request.reasoning else None, "summary": None},
            "store": request.store,
            "temperature": request.temperature if request.temperature is not None else defaults.get("temperature", 1.0),
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": request.tool_choice.model_dump() if isinstance(request.tool_choice, FunctionChoice)
            else request.tool_choice or "auto",
            "tools": [t.model_dump() for t in request.tools or []],
            "top_p": request.top_p if request.top_p is not None else defaults.get("top_p", 1.0),
            "truncation": "disabled" if self._policy(request) == "error" else "auto",
            "usage": None, "user": request.user, "metadata": request.metadata or {},
            "context_management": turn.fitted.context_management,
        }

    async def _events(self, turn: _Turn, run) -> AsyncIterator[tuple[str, dict]]:
        """The stream events of one response, ending with response.completed (or .incomplete); a
        failure is an `error` event, then response.failed. The turn is stored before the end."""
        yield "response.created", {"response": turn.head}
        yield "response.in_progress", {"response": turn.head}
        output, choice = _Output(), run.choice               # run: a ToolLoop (deployments/tool_loop.py)
        mcp = ResponsesMcp(output.items, close_open=lambda: output.finish(False))
        for event in mcp.listings(turn.tools.listings, turn.listed):
            yield event
        try:
            async for step in run.events():
                for event in output.feed(step.events, choice) if isinstance(step, Generated) else mcp.event(step):
                    yield event
            for event in mcp.not_run(choice.server_calls, turn.tools.max_steps):
                yield event
            incomplete = choice.finish_reason in ("length", MAX_TOOL_STEPS)
            for event in output.finish(incomplete):
                yield event
            reason = MAX_TOOL_STEPS if choice.finish_reason == MAX_TOOL_STEPS else "max_output_tokens"
            response = {**turn.head, "status": "incomplete" if incomplete else "completed",
                        "completed_at": int(time.time()),
                        "incomplete_details": {"reason": reason} if incomplete else None,
                        "output": output.items, "usage": self._usage(choice)}
            if turn.request.store:
                await self._stored(self.store.put(StoredResponse(
                    turn.id, turn.tenant.name, turn.conversation_id, turn.request.previous_response_id,
                    turn.input, output.items, {k: v for k, v in response.items() if k != "output"},
                    turn.fitted.summary, turn.fitted.dropped_through, turn.created_at)))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            error = error if isinstance(error, APIError) else APIError(500, f"internal error: {type(error).__name__}: "
                                                                            f"{error}")
            yield "error", {"code": error.code or error.body()["error"]["type"], "message": error.message,
                            "param": error.param, "_error": error}
            yield "response.failed", {"response": {**turn.head, "status": "failed", "output": output.items,
                                                   "error": {"code": error.code or "server_error",
                                                             "message": error.message}}}
            return
        yield ("response.completed" if response["status"] == "completed" else "response.incomplete",
               {"response": response})

    @staticmethod
    async def _sse(events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[str]:
        sequence = 0
        async for kind, fields in events:
            fields = {k: v for k, v in fields.items() if not k.startswith("_")}
            payload = json.dumps({"type": kind, "sequence_number": sequence, **fields}, ensure_ascii=False)
            sequence += 1
            yield f"event: {kind}\ndata: {payload}\n\n"

    def _usage(self, choice) -> dict:
        reasoning = "".join(choice.reasoning)
        reasoning_tokens = len(self.ingress.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return {"input_tokens": choice.prompt_tokens, "input_tokens_details": {"cached_tokens": choice.cached_tokens},
                "output_tokens": choice.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, choice.completion_tokens)},
                "total_tokens": choice.prompt_tokens + choice.completion_tokens}

    @staticmethod
    async def _stored(call):
        """A store call; a store that cannot be reached is a 503."""
        try:
            return await call
        except StoreError as error:
            raise APIError(503, str(error), code="session_store_unavailable") from None
