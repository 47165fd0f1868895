"""The ingress deployment: OpenAI's HTTP API in front of the router deployment.

One chat request, top to bottom (`Ingress.chat_completions`):

    validate the body -> render the chat (truncating if asked) -> check the context length
    -> build the output constraint -> one router stream per choice (n) -> wait for each first output
    (so a full queue or a bad request is an HTTP status, not a broken stream)
    -> parse reasoning / content / tool calls -> SSE chunks or one JSON body

Errors are OpenAI's `{"error": {...}}` bodies: 400 invalid request (and context too long), 404
unknown model, 429 with Retry-After when the router's queue is full, 503 while it is not ready.
"""

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from deployments.chat import ChatFormat
from deployments.grpc_api import GrpcServicer
from deployments.metrics import HTTPMetrics, IngressMetrics
from deployments.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from deployments.responses import Responses, ResponsesRequest
from deployments.router import RouterBusyError
from deployments.server_tools import RequestMcpServer, ToolRegistry, ToolSet
from deployments.store import open_store
from deployments.tenants import ANONYMOUS, Limiter, Tenant, TenantAuth, TenantRegistry, tenant_of
from models.chat_output import Event
from models.registry import load_config
from models.tokenizer import Tokenizer
from router.engine import RequestOutput
from router.sampling import SampleResult, SamplingParams

log = logging.getLogger(__name__)

app = FastAPI(title="expertmesh", description="OpenAI-compatible API of an expertmesh cluster")


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return await _api_error(request, APIError(400, str(error)))


def _replica_tenants() -> TenantRegistry:
    """The tenants of the replica serving the request (Serve froze a copy of `app`, so ask the replica)."""
    return serve.get_replica_context().servable_object.tenants


# Authorization: Bearer KEY -> request.state.tenant, or 401; /health and /ready stay open.
app.add_middleware(TenantAuth, registry=_replica_tenants)


def as_api_error(error: BaseException) -> APIError:
    """What a failure from the router (or Serve, on the way there) means to the client."""
    cause = getattr(error, "cause", None) or error           # Ray wraps a replica's exception
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, RouterBusyError):
        return APIError(429, str(cause), code="queue_full", headers={"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, BackPressureError):
        return APIError(429, "the router deployment's queue is full; retry later", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(cause, DeploymentUnavailableError):
        return APIError(503, f"the router is not available: {cause}")
    if isinstance(cause, ValueError):
        return APIError(400, str(cause))
    log.error("request failed: %r", error)
    return APIError(500, f"internal error: {type(cause).__name__}: {cause}")


# -- per-choice state ------------------------------------------------------------------------------

@dataclass
class _Choice:
    """One of the `n` choices while it streams: its parser and what it has produced."""
    index: int
    parser: Any = None
    include_reasoning: bool = True
    parallel_tool_calls: bool = True
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[SampleResult] = field(default_factory=list)
    text: list[str] = field(default_factory=list)           # raw text (completions)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, output: RequestOutput) -> list[Event]:
        """Take one router output; return the parsed events it completes."""
        self.prompt_tokens, self.cached_tokens = output.prompt_tokens, output.cached_tokens
        self.completion_tokens = output.completion_tokens
        self.logprobs += output.logprobs or []
        self.text.append(output.text)
        events = self.parser.feed(output.text) if self.parser else []
        if output.finished:
            self.finish_reason = output.finish_reason
            events += self.parser.finish() if self.parser else []
        return [e for e in map(self._keep, events) if e is not None]

    def _keep(self, event: Event) -> Event | None:
        if event.kind == "reasoning":
            if not self.include_reasoning:
                return None
            self.reasoning.append(event.text)
        elif event.kind == "content":
            self.content.append(event.text)
        elif event.kind == "tool_call":
            if self.tool_calls and not self.parallel_tool_calls:
                return None                                 # one call asked for: later ones are dropped
            self.tool_calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                    "function": {"name": event.call.name, "arguments": event.call.arguments}})
        return event

    @property
    def chat_finish_reason(self) -> str | None:
        if self.finish_reason == "stop" and self.tool_calls:
            return "tool_calls"
        return self.finish_reason


@dataclass
class ChatRun:
    """A started chat request: its id, the per-choice state and the router streams that feed it
    (consume them with `Ingress._outputs(run.streams)` and `choice.add(output)`)."""
    request_id: str
    choices: list[_Choice]
    streams: list
    rendered: Any                                          # deployments.chat.RenderedChat
    tenant: Tenant


@dataclass
class CompletionRun:
    """A started completion request, like ChatRun: one token prompt and one choice per prompt and `n`."""
    request_id: str
    choices: list[_Choice]
    streams: list
    prompts: list[list[int]]                               # the prompt of each choice
    prompt_tokens: int                                     # usage: the distinct prompts' tokens
    tenant: Tenant


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as items arrive: (index, item)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as error:  # delivered to the consumer, which decides
            await queue.put((i, error))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


# -- the deployment ----------------------------------------------------------------------------------

# Last before serve.ingress freezes the app: the outermost middleware, it counts every answer.
app.add_middleware(HTTPMetrics)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress(GrpcServicer):      # + the gRPC API's methods (Generate, Chat, ...): deployments/grpc_api.py
    def __init__(self, router: DeploymentHandle, config: ClusterConfig):
        from models.smollm2_moe import resolve_model

        self.router = router
        self.config = config
        self.model_id = config.model.served_id
        self.model_dir = resolve_model(config.model.source)
        _, model_config = load_config(self.model_dir)
        self.tokenizer = Tokenizer.from_pretrained(self.model_dir, model_config.model_type)
        self.chat = ChatFormat(self.tokenizer, model_config.model_type)
        self.defaults = self._generation_defaults()
        self.created = int(time.time())
        self._router_info: dict | None = None
        self.responses = Responses(self, open_store(config.sessions), config.sessions)
        self.metrics = IngressMetrics(self.model_id)       # HTTPMetrics finds it here
        self.tenants = TenantRegistry.from_config(config)   # API keys -> tenants; warns when open
        self.limits = Limiter(config.name, self.tenants.tenants.values(),   # shared by all replicas
                              on_rejection=self.metrics.rate_limited)
        # MCP servers and webhooks per tenant: deployments/server_tools.py, the loop in tool_loop.py
        self.server_tools = ToolRegistry.from_config(config, on_call=self.metrics.tool_call)

    def _generation_defaults(self) -> dict:
        """Sampling defaults the checkpoint recommends (generation_config.json), as vLLM applies them."""
        path = self.model_dir / "generation_config.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
        return {k: raw[k] for k in ("temperature", "top_p", "top_k") if raw.get(k) is not None}

    async def router_info(self) -> dict:
        if self._router_info is None:
            try:
                self._router_info = await self.router.info.remote()
            except Exception as error:
                raise APIError(503, f"the model is not ready: {as_api_error(error).message}") from None
        return self._router_info

    # -- plain endpoints --

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> dict:
        """Ready when a router replica answers: its engine, model and expert groups are up."""
        try:
            info = await asyncio.wait_for(self.router.info.remote(), timeout=5)
        except Exception as error:
            raise APIError(503, f"not ready: {type(error).__name__}: {error}") from None
        self._router_info = info
        return {"status": "ready", "model": self.model_id, **info}

    @app.get("/v1/models")
    async def models(self) -> dict:
        info = self._router_info or {}
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "expertmesh",
            "root": str(self.config.model.source), "max_model_len": info.get("max_model_len")}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return (await self.models())["data"][0]

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_id}`.",
                           param="model", code="model_not_found")

    @staticmethod
    async def _body(request: Request, schema):
        try:
            raw = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(raw)
        except ValidationError as error:
            raise validation_error(error) from None

    # -- chat completions --

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        tenant = tenant_of(request)
        tools = await self.resolve_tools(body, tenant)
        if tools.tools:                  # the model may call tools the service runs: deployments/tool_loop.py
            from deployments.tool_loop import chat_completion

            return await chat_completion(self, body, tenant, tools)
        run = await self.start_chat(body, tenant)
        if body.stream:
            return StreamingResponse(self._chat_chunks(body, run.request_id, run.choices, run.streams),
                                     media_type="text/event-stream")
        return await self._chat_response(body, run.request_id, run.choices, run.streams)

    async def resolve_tools(self, body: ChatCompletionRequest, tenant: Tenant,
                            request_servers: list[RequestMcpServer] = ()) -> ToolSet:
        """The server-side tools a chat request of `tenant` may use: its MCP servers' tools (listed,
        cached) and webhooks, and the MCP servers the request names (a 400 unless allowed); none
        when tool_choice is none. A function of the request's own named like one of them is a 400."""
        if body.tool_choice == "none" and not request_servers:
            return ToolSet()
        return await self.server_tools.resolve(tenant.name, request_servers,
                                               reserved_names={t.function.name for t in body.tools or []})

    async def start_chat(self, body: ChatCompletionRequest, tenant: Tenant = ANONYMOUS,
                         request_id: str | None = None, session: str | None = None) -> ChatRun:
        """The transport-neutral core of a chat request (HTTP chat completions, the Responses API and
        gRPC Chat all come through here): validate, render, constrain, and start one router stream
        per choice. Raises APIError for anything the client must be told before streaming starts.
        `session` names the conversation (for router-replica affinity: its KV prefix lives there);
        default: the body's `prompt_cache_key`."""
        self._check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        info = await self.router_info()
        requested = body.max_completion_tokens or body.max_tokens
        # Templates, tokenization and grammar compilation are CPU work: off the event loop.
        rendered = await asyncio.to_thread(self.chat.render_to_fit, body, self.context_tokens(tenant, info), requested)
        max_tokens = self._budget(tenant, info, len(rendered.token_ids), requested, "messages")
        grammar = await asyncio.to_thread(self.chat.grammar, body, rendered.text)
        params = self._sampling_params(body, max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                       grammar=grammar, skip_special_tokens=body.skip_special_tokens
                                       and not self.chat.harmony)
        choices = [_Choice(i, self.chat.parser(body, rendered.text), body.include_reasoning, body.parallel_tool_calls)
                   for i in range(body.n)]
        request_id = request_id or f"chatcmpl-{uuid.uuid4().hex}"
        session = session or body.prompt_cache_key
        streams = await self._start([rendered.token_ids] * body.n, params, request_id, tenant, session)
        return ChatRun(request_id, choices, streams, rendered, tenant)

    async def _chat_response(self, body, request_id, choices, streams) -> dict:
        async for i, output in self._outputs(streams):
            choices[i].add(output)
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{
                "index": c.index,
                "message": {"role": "assistant",
                            "content": "".join(c.content) if c.content or not c.tool_calls else None,
                            **({"reasoning_content": "".join(c.reasoning)} if c.reasoning else {}),
                            **({"tool_calls": c.tool_calls} if c.tool_calls else {})},
                "logprobs": {"content": self._chat_logprobs(c.logprobs)} if body.logprobs else None,
                "finish_reason": c.chat_finish_reason,
            } for c in choices],
            "usage": self._usage(choices, len(choices) and choices[0].prompt_tokens),
        }

    async def _chat_chunks(self, body, request_id, choices, streams) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice: _Choice, delta: dict, logprobs=None, finish=None) -> str:
            return _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                         "model": self.model_id,
                         "choices": [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish}],
                         **({"usage": None} if include_usage else {})})

        for choice in choices:
            yield chunk(choice, {"role": "assistant", "content": ""})
        try:
            async for i, output in self._outputs(streams):
                choice = choices[i]
                calls_before = len(choice.tool_calls)
                events = choice.add(output)
                logprobs = {"content": self._chat_logprobs(output.logprobs)} \
                    if body.logprobs and output.logprobs else None
                for event in events:
                    if event.kind == "tool_call":
                        if len(choice.tool_calls) > calls_before:
                            index = calls_before
                            calls_before += 1
                            yield chunk(choice, {"tool_calls": [{"index": index, **choice.tool_calls[index]}]})
                    elif event.text:
                        key = "reasoning_content" if event.kind == "reasoning" else "content"
                        yield chunk(choice, {key: event.text}, logprobs)
                        logprobs = None
                if logprobs:                                     # tokens whose text is still held back
                    yield chunk(choice, {}, logprobs)
                if output.finished:
                    yield chunk(choice, {}, None, choice.chat_finish_reason)
            if include_usage:
                yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_id, "choices": [],
                            "usage": self._usage(choices, choices[0].prompt_tokens)})
        except Exception as error:  # the status line is gone: report in the stream, as OpenAI does
            yield _sse(as_api_error(error).body())
        yield _sse("[DONE]")

    # -- the Responses API (deployments/responses.py: conversations, the session store) --

    @app.post("/v1/responses")
    async def create_response(self, request: Request):
        body: ResponsesRequest = await self._body(request, ResponsesRequest)
        result = await self.responses.create(body, tenant_of(request))
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream")

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str, request: Request) -> dict:
        return await self.responses.retrieve(response_id, tenant_of(request), dict(request.query_params))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(self, response_id: str, request: Request) -> dict:
        return await self.responses.delete(response_id, tenant_of(request))

    # -- completions --

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body: CompletionRequest = await self._body(request, CompletionRequest)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        run = await self.start_completion(body, tenant_of(request))
        request_id, choices, streams = run.request_id, run.choices, run.streams
        echo = [self.tokenizer.decode(p) if body.echo else "" for p in run.prompts]
        if body.stream:
            return StreamingResponse(self._completion_chunks(body, request_id, choices, streams, echo,
                                                             run.prompt_tokens),
                                     media_type="text/event-stream")
        async for i, output in self._outputs(streams):
            choices[i].add(output)
        return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_id,
                "choices": [{"index": c.index, "text": echo[c.index] + "".join(c.text),
                             "logprobs": self._completion_logprobs(c.logprobs) if body.logprobs is not None else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": self._usage(choices, run.prompt_tokens)}

    async def start_completion(self, body: CompletionRequest, tenant: Tenant = ANONYMOUS) -> CompletionRun:
        """The transport-neutral core of a completion request (HTTP completions and gRPC Generate):
        tokenize, check the context, and start one router stream per prompt and choice."""
        self._check_model(body.model)
        info = await self.router_info()
        prompts = await asyncio.to_thread(self._completion_prompts, body.prompt)
        max_tokens = min(self._budget(tenant, info, len(p), body.max_tokens or 16, "prompt") for p in prompts)
        params = self._sampling_params(body, max_tokens, logprobs=body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        token_prompts = [p for p in prompts for _ in range(body.n)]
        choices = [_Choice(i) for i in range(len(token_prompts))]
        streams = await self._start(token_prompts, params, request_id, tenant, body.prompt_cache_key)
        return CompletionRun(request_id, choices, streams, token_prompts, sum(map(len, prompts)), tenant)

    async def _completion_chunks(self, body, request_id, choices, streams, echo, prompt_tokens) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str, logprobs=None, finish=None) -> str:
            return _sse({"id": request_id, "object": "text_completion", "created": created, "model": self.model_id,
                         "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                         **({"usage": None} if include_usage else {})})

        try:
            for choice in choices:
                if echo[choice.index]:
                    yield chunk(choice.index, echo[choice.index])
            async for i, output in self._outputs(streams):
                choices[i].add(output)
                logprobs = self._completion_logprobs(output.logprobs) if body.logprobs is not None else None
                if output.text or logprobs or output.finished:
                    yield chunk(i, output.text, logprobs, output.finish_reason)
            if include_usage:
                yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": self.model_id,
                            "choices": [], "usage": self._usage(choices, prompt_tokens)})
        except Exception as error:
            yield _sse(as_api_error(error).body())
        yield _sse("[DONE]")

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        return [self.tokenizer.encode(p) for p in prompts]

    # -- shared steps --

    def context_tokens(self, tenant: Tenant, info: dict) -> int:
        """The context a request of `tenant` gets: the model's, or the tenant's max_context_tokens when smaller."""
        limit = tenant.limits.max_context_tokens
        return info["max_model_len"] if limit is None else min(limit, info["max_model_len"])

    def _budget(self, tenant: Tenant, info: dict, prompt_tokens: int, requested: int | None, param: str) -> int:
        """`_max_tokens` within the tenant's context; a refusal by its max_context_tokens is counted."""
        context = self.context_tokens(tenant, info)
        if context == info["max_model_len"]:
            return self._max_tokens(prompt_tokens, requested, context, param)
        try:
            return self._max_tokens(prompt_tokens, requested, context, param,
                                    whose=f"Tenant {tenant.name!r}'s maximum context length (max_context_tokens)")
        except APIError:
            self.limits.rejected(tenant, "max_context_tokens")
            raise

    def _max_tokens(self, prompt_tokens: int, requested: int | None, max_model_len: int, param: str, *,
                    whose: str = "This model's maximum context length") -> int:
        """The completion budget; a prompt that leaves no room is a 400 with both token counts."""
        completion = requested if requested is not None else max_model_len - prompt_tokens
        if prompt_tokens + max(completion, 1) > max_model_len:
            what = "messages" if param == "messages" else "prompt"
            raise APIError(400, f"{whose} is {max_model_len} tokens. However, you "
                                f"requested {prompt_tokens + max(completion, 0)} tokens ({prompt_tokens} in the "
                                f"{what}, {max(completion, 0)} in the completion). Please reduce the length of the "
                                f"{what} or completion" + (", or set truncation: \"auto\" to drop the oldest turns."
                                                           if param == "messages" else "."),
                           param=param, code="context_length_exceeded")
        return completion

    def _sampling_params(self, body, max_tokens: int, *, logprobs: int | None, grammar: str | None = None,
                         skip_special_tokens: bool = True) -> SamplingParams:
        pick = lambda value, key, fallback: value if value is not None else self.defaults.get(key, fallback)  # noqa: E731
        logit_bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        vocab = (self._router_info or {}).get("vocab_size")
        if vocab is not None and any(t >= vocab for t in logit_bias):
            raise APIError(400, f"logit_bias names token {max(logit_bias)}, but the vocabulary has {vocab} "
                                f"tokens (ids 0..{vocab - 1})", param="logit_bias")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=pick(body.temperature, "temperature", 1.0),
                top_p=pick(body.top_p, "top_p", 1.0), top_k=pick(body.top_k, "top_k", 0),
                min_p=body.min_p or 0.0, seed=body.seed, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty or 1.0,
                stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                min_tokens=min(body.min_tokens, max_tokens), logprobs=logprobs,
                include_stop_str_in_output=body.include_stop_str_in_output,
                skip_special_tokens=skip_special_tokens, grammar=grammar, logit_bias=logit_bias)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    async def _start(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
                     tenant: Tenant = ANONYMOUS, session: str | None = None) -> list:
        """Send one router request per choice and wait for each one's first output, so that a full
        queue, a bad request or an unready router is an HTTP status. Returns (first, rest) pairs.
        The tenant's shared limits admit it first (429 over one); its streams hold the lease."""
        lease = await self.limits.admit(tenant, sum(len(p) + params.max_tokens for p in prompts))
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                # Each choice of a seeded request gets its own seed, so `n` samples differ.
                choice_params = params if params.seed is None or i == 0 else \
                    dataclasses.replace(params, seed=params.seed + i)
                stream = self.router.options(stream=True).generate.remote(prompt, choice_params, f"{request_id}-{i}",
                                                                        tenant.name, session=session)
                streams.append((lease.wrap(stream) if lease else stream, None))
            started = []
            for stream, _ in streams:
                started.append((stream, await stream.__anext__()))
            return started
        except BaseException as error:
            for stream, _ in streams:
                stream.cancel()
            if lease:
                lease.release()
            if isinstance(error, (asyncio.CancelledError, StopAsyncIteration)):
                raise
            raise as_api_error(error) from None

    @staticmethod
    async def _outputs(streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All choices' outputs as they come; leaving early (a client that left) cancels the rest."""
        async def one(first, stream):
            yield first
            if not first.finished:
                async for output in stream:
                    yield output

        try:
            async for i, output in _merge([one(first, stream) for stream, first in streams]):
                yield i, output
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise as_api_error(error) from None
        finally:
            for stream, _ in streams:
                stream.cancel()

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, results: list[SampleResult] | None) -> list[dict]:
        out = []
        for r in results or []:
            token = self._token_text(r.token_id)
            out.append({"token": token, "logprob": r.logprob.logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": (t := self._token_text(top.token_id)), "logprob": top.logprob,
                                          "bytes": list(t.encode())} for top in r.top_logprobs]})
        return out

    def _completion_logprobs(self, results: list[SampleResult] | None) -> dict:
        tokens = [self._token_text(r.token_id) for r in results or []]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [r.logprob.logprob for r in results or []],
                "top_logprobs": [{self._token_text(t.token_id): t.logprob for t in r.top_logprobs}
                                 for r in results or []],
                "text_offset": offsets}

    @staticmethod
    def _usage(choices: list[_Choice], prompt: int) -> dict:
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": max((c.cached_tokens for c in choices), default=0)}}
