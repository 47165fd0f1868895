"""The public gRPC API (protos/expertmesh.proto, `expertmesh.v1.Inference`) on the ingress deployment.

Ray Serve's gRPC proxy takes the calls (config `grpc`: port 9000, reflection) and routes each to
the ingress deployment of the app named in the `application` metadata, calling the method of the
same name: `Generate`, `Chat`, `ListModels`, `Health`, which `Ingress` inherits from `GrpcServicer`.
A call goes through the same core as its HTTP counterpart: the request message becomes the HTTP
API's body (`CompletionRequest`, `ChatCompletionRequest`), validated by the same models, and runs
through `Ingress.start_completion` / `Ingress.start_chat`. So a field means the same on both.

    metadata authorization -> tenant -> proto -> body -> start_* -> router streams
    -> one reply message per output (chat: per parsed delta) -> finish_reason -> usage

A Chat of a tenant with server-side tools runs the tool loop (deployments/tool_loop.py) as chat
completions do, and reports each of those calls in `server_tool_call`.

Errors are the HTTP API's `APIError`s, mapped to status codes (`STATUS`); the replica sets the code
on Serve's `grpc_context` and raises, and Serve's proxy answers with that code and the message as
details. A client that cancels its stream cancels the replica's generator, which cancels the
router streams, which aborts the requests in the engine.

This module is also imported by Serve's proxy (`add_InferenceServicer_to_server`, the servicer
function of `grpc_options`), so at module level it imports only grpc, protobuf and pydantic models.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any, AsyncIterator

import grpc
from pydantic import ValidationError

from deployments.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from deployments.tenants import Tenant
from protos import expertmesh_pb2 as pb
from protos import expertmesh_pb2_grpc as pb_grpc

SERVICE = "expertmesh.v1.Inference"
SERVICER_FUNCTION = f"{__name__}.add_InferenceServicer_to_server"   # for Serve's grpc_options

# HTTP status of an APIError -> gRPC status code.
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}

# Serve's proxy forwards a replica's status code and details but drops its trailing metadata when
# the call fails, so a RESOURCE_EXHAUSTED says when to retry in its details, and the proxy-side
# wrapper below copies that into the `retry-after` trailing metadata.
RETRY_AFTER = "retry-after"
_RETRY_HINT = " (retry after {}s)"
_RETRY_HINT_RE = re.compile(r" \(retry after (\d+)s\)$")


def grpc_status(error: APIError) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client sees for this error."""
    code = STATUS.get(error.status, grpc.StatusCode.INTERNAL)
    retry_after = error.headers.get("Retry-After")
    details = error.message + (_RETRY_HINT.format(retry_after) if retry_after else "")
    return code, details


# -- request messages -> the HTTP API's bodies -----------------------------------------------------

def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise APIError(400, f"{where} is not valid JSON: {error}", param=where.split(".")[0]) from None


def _validate(schema, raw: dict):
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise validation_error(error) from None


def _sampling(message: pb.SamplingParams) -> dict:
    """The set fields of SamplingParams, under the HTTP API's names."""
    raw: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty"):
        if message.HasField(name):
            raw[name] = getattr(message, name)
    for name in ("presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output"):
        if getattr(message, name):
            raw[name] = getattr(message, name)
    if message.stop:
        raw["stop"] = list(message.stop)
    if message.stop_token_ids:
        raw["stop_token_ids"] = list(message.stop_token_ids)
    raw["n"] = message.n or 1
    return raw


def completion_body(request: pb.GenerateRequest) -> CompletionRequest:
    """A Generate request as the body of POST /v1/completions."""
    which = request.WhichOneof("prompt")
    if which is None:
        raise APIError(400, "the prompt is empty: set text or token_ids", param="prompt")
    raw: dict[str, Any] = {"model": request.model, **_sampling(request.sampling),
                           "prompt": request.text if which == "text" else list(request.token_ids.ids)}
    if request.HasField("logprobs"):
        raw["logprobs"] = request.logprobs
    if request.prompt_cache_key:
        raw["prompt_cache_key"] = request.prompt_cache_key
    return _validate(CompletionRequest, raw)


def _message(message: pb.ChatMessage) -> dict:
    raw: dict[str, Any] = {"role": message.role}
    if message.HasField("content"):
        raw["content"] = message.content
    for name in ("name", "tool_call_id", "reasoning_content"):
        if getattr(message, name):
            raw[name] = getattr(message, name)
    if message.tool_calls:
        raw["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}}
                             for call in message.tool_calls]
    return raw


def _tool(tool: pb.Tool, i: int) -> dict:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters:
        function["parameters"] = _json(tool.parameters, f"tools.{i}.parameters")
    if tool.HasField("strict"):
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def chat_body(request: pb.ChatRequest) -> ChatCompletionRequest:
    """A Chat request as the body of POST /v1/chat/completions."""
    raw: dict[str, Any] = {"model": request.model, "messages": [_message(m) for m in request.messages],
                           **_sampling(request.sampling)}
    if request.tools:
        raw["tools"] = [_tool(tool, i) for i, tool in enumerate(request.tools)]
    choice = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if choice == "mode":
        raw["tool_choice"] = request.tool_choice.mode
    elif choice == "function":
        raw["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.function}}
    for name in ("parallel_tool_calls", "include_reasoning", "thinking_token_budget"):
        if request.HasField(name):
            raw[name] = getattr(request, name)
    if request.HasField("response_format"):
        fmt = request.response_format
        raw["response_format"] = {"type": fmt.type}
        if fmt.json_schema or fmt.name or fmt.HasField("strict"):
            schema: dict[str, Any] = {"name": fmt.name or "response"}
            if fmt.json_schema:
                schema["schema"] = _json(fmt.json_schema, "response_format.json_schema")
            if fmt.HasField("strict"):
                schema["strict"] = fmt.strict
            raw["response_format"]["json_schema"] = schema
    if request.reasoning_effort:
        raw["reasoning_effort"] = request.reasoning_effort
    if request.HasField("enable_thinking"):
        raw["chat_template_kwargs"] = {"enable_thinking": request.enable_thinking}
    if request.truncation:
        raw["truncation"] = request.truncation
    if request.prompt_cache_key:
        raw["prompt_cache_key"] = request.prompt_cache_key
    return _validate(ChatCompletionRequest, raw)


def _usage(choices, prompt_tokens: int) -> pb.Usage:
    completion = sum(c.completion_tokens for c in choices)
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                    total_tokens=prompt_tokens + completion,
                    cached_tokens=max((c.cached_tokens for c in choices), default=0))


def _logprobs(results) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=r.token_id, logprob=r.logprob.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob)
                                          for t in r.top_logprobs])
            for r in results or []]


def _tool_call(call: dict) -> pb.ToolCall:
    return pb.ToolCall(id=call["id"], name=call["function"]["name"], arguments=call["function"]["arguments"])


def _server_tool_call(call) -> pb.ServerToolCall:
    entry = call.as_chat()
    return pb.ServerToolCall(id=entry["id"], name=entry["function"]["name"], arguments=entry["function"]["arguments"],
                             server_label=entry["server_label"] or "", status=entry["status"],
                             output=entry["output"], error=entry["error"])


def _text(request_id: str, index: int, event) -> pb.ChatResponse | None:
    if not event.text:
        return None
    field = "reasoning" if event.kind == "reasoning" else "content"
    return pb.ChatResponse(id=request_id, index=index, **{field: event.text})


async def _chat_replies(run, outputs) -> AsyncIterator[pb.ChatResponse]:
    """A started chat (`Ingress.start_chat`) as reply messages: per parsed delta, then each choice's
    finish_reason, then usage. `outputs` is `Ingress._outputs`."""
    async for i, output in outputs(run.streams):
        choice = run.choices[i]
        calls_before = len(choice.tool_calls)
        for event in choice.add(output):
            if event.kind != "tool_call":
                if reply := _text(run.request_id, i, event):
                    yield reply
            elif len(choice.tool_calls) > calls_before:        # not dropped (parallel_tool_calls false)
                yield pb.ChatResponse(id=run.request_id, index=i, tool_call=_tool_call(choice.tool_calls[calls_before]))
                calls_before += 1
        if output.finished:
            yield pb.ChatResponse(id=run.request_id, index=i, finish_reason=choice.chat_finish_reason)
    yield pb.ChatResponse(id=run.request_id, usage=_usage(run.choices, run.choices[0].prompt_tokens))


async def _tool_loop_replies(ingress, body: ChatCompletionRequest, tenant: Tenant, tools) -> AsyncIterator[pb.ChatResponse]:
    """A chat whose model may call tools the service runs (deployments/tool_loop.py), as the HTTP
    API streams it: the client's calls and text pass through, each server-side call is reported
    when made and when it has run; the usage counts every step."""
    from deployments.ingress import _merge
    from deployments.tool_loop import Generated, _usage as loop_usage, start_loops

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    loops = await start_loops(ingress, body, tenant, tools, request_id)
    client_calls = [0] * len(loops)
    try:
        async for i, event in _merge([loop.events() for loop in loops]):
            if not isinstance(event, Generated):                  # CallStarted, CallDone
                yield pb.ChatResponse(id=request_id, index=i, server_tool_call=_server_tool_call(event.call))
                continue
            for parsed in event.events:
                if parsed.kind == "tool_call":
                    call = loops[i].choice.tool_calls[client_calls[i]]
                    client_calls[i] += 1
                    yield pb.ChatResponse(id=request_id, index=i, tool_call=_tool_call(call))
                elif reply := _text(request_id, i, parsed):
                    yield reply
        for loop in loops:
            for call in loop.choice.server_calls:
                if not call.run:                                  # the step limit stopped it: never ran
                    yield pb.ChatResponse(id=request_id, index=loop.index, server_tool_call=_server_tool_call(call))
            yield pb.ChatResponse(id=request_id, index=loop.index, finish_reason=loop.choice.chat_finish_reason)
        usage = loop_usage(loops)
        yield pb.ChatResponse(id=request_id, usage=pb.Usage(
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
            total_tokens=usage["total_tokens"], cached_tokens=usage["prompt_tokens_details"]["cached_tokens"]))
    finally:
        for loop in loops:
            loop.close()


# -- the methods, on the ingress deployment ---------------------------------------------------------

class GrpcServicer:
    """`expertmesh.v1.Inference` for the ingress deployment (a mixin of `Ingress`, whose chat and
    completion cores, router handle and model id it uses). Serve calls these by the RPC's name
    with the request message and its `grpc_context` (metadata in, status code out)."""

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            tenant = self._grpc_tenant(grpc_context)
            run = await self.start_completion(completion_body(request), tenant)
            async for i, output in self._outputs(run.streams):
                run.choices[i].add(output)
                yield pb.GenerateResponse(id=run.request_id, index=i, token_ids=output.token_ids, text=output.text,
                                          logprobs=_logprobs(output.logprobs), finish_reason=output.finish_reason)
            yield pb.GenerateResponse(id=run.request_id, usage=_usage(run.choices, run.prompt_tokens))
        except Exception as error:
            raise self._grpc_error(grpc_context, error) from None

    async def Chat(self, request: pb.ChatRequest, grpc_context) -> AsyncIterator[pb.ChatResponse]:
        try:
            tenant = self._grpc_tenant(grpc_context)
            body = chat_body(request)
            tools = await self.resolve_tools(body, tenant)
            replies = _tool_loop_replies(self, body, tenant, tools) if tools.tools else \
                _chat_replies(await self.start_chat(body, tenant), self._outputs)
            async for reply in replies:
                yield reply
        except Exception as error:
            raise self._grpc_error(grpc_context, error) from None

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self._grpc_tenant(grpc_context)
            [model] = (await self.models())["data"]
            return pb.ListModelsResponse(models=[pb.Model(
                id=model["id"], created=model["created"], owned_by=model["owned_by"], root=model["root"],
                max_model_len=model["max_model_len"] or 0)])
        except Exception as error:
            raise self._grpc_error(grpc_context, error) from None

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        """Open to all, like /ready: SERVING when a router replica answers within 5 seconds."""
        try:
            info = await asyncio.wait_for(self.router.info.remote(), timeout=5)
        except Exception as error:
            return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING, model=self.model_id,
                                     message=f"not ready: {type(error).__name__}: {error}")
        self._router_info = info
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, model=self.model_id,
                                 max_model_len=info["max_model_len"], expert_groups=info["expert_groups"],
                                 transport=info["transport"])

    # -- shared steps --

    def _grpc_tenant(self, grpc_context) -> Tenant:
        """The tenant of the `authorization: Bearer <key>` metadata, resolved as the HTTP API
        resolves its header (`Ingress.tenants`: APIError 401 without a known key, unless open)."""
        return self.tenants.authenticate(dict(grpc_context.invocation_metadata()).get("authorization"))

    @staticmethod
    def _grpc_error(grpc_context, error: Exception) -> APIError:
        """Set the status code and details Serve's proxy answers with; the error to raise."""
        from deployments.ingress import as_api_error

        api_error = error if isinstance(error, APIError) else as_api_error(error)
        code, details = grpc_status(api_error)
        grpc_context.set_code(code)
        grpc_context.set_details(details)
        return api_error


# -- on Serve's proxy -------------------------------------------------------------------------------

def add_InferenceServicer_to_server(servicer, server) -> None:
    """The servicer function for Serve's `grpc_options.grpc_servicer_functions`: registers
    expertmesh.v1.Inference on the proxy's gRPC server (Serve replaces each method's behavior with
    a call to the app's ingress), and has each method's failure carry `retry-after` in trailing
    metadata when its details say when to retry."""
    pb_grpc.add_InferenceServicer_to_server(servicer, _RetryAfterServer(server))


class _RetryAfterServer:
    """Serve's gRPC server as the generated registration code sees it: handlers are registered
    (and overridden by Serve) as usual, then wrapped to add `retry-after`. Only the generic
    handlers are registered: gRPC falls back to them for every method, so no call bypasses the
    wrapper through a registered-method handler."""

    def __init__(self, server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(handlers)
        for handler in handlers:
            handler._method_handlers = {method: _with_retry_after(h) for method, h in handler._method_handlers.items()}

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        pass


def _retry_after_trailer(context) -> None:
    if context.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return
    match = _RETRY_HINT_RE.search(context.details() or "")
    if match:
        trailing = tuple(context.trailing_metadata() or ())
        context.set_trailing_metadata(trailing + ((RETRY_AFTER, match.group(1)),))


def _with_retry_after(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    unary, stream = handler.unary_unary, handler.unary_stream

    async def unary_unary(request, context):
        try:
            return await unary(request, context)
        finally:
            _retry_after_trailer(context)

    async def unary_stream(request, context):
        try:
            async for message in stream(request, context):
                yield message
        finally:
            _retry_after_trailer(context)

    return handler._replace(unary_unary=unary_unary, unary_stream=unary_stream)
