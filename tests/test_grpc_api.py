"""The public gRPC API (expertmesh.v1.Inference) of a real Serve app, over a real grpc channel to
Serve's gRPC proxy, with the generated stubs (protos/expertmesh_pb2*.py).

The app serves a tiny random Qwen3-MoE checkpoint: the tests check what does not depend on the
words (token-for-token equality with the HTTP API for the same greedy request, output that a
constraint makes valid, counts, finish reasons, status codes), as tests/test_serve_openai.py does
for the HTTP API."""
from __future__ import annotations

import json
import time

import grpc
import jsonschema
import openai
import pytest

from deployments.tenants import hash_key
from protos import expertmesh_pb2 as pb
from protos import expertmesh_pb2_grpc as pb_grpc
from tests import chat_checkpoints
from tests.serving import deployed, router_stats, tiny_config
from tests.tool_servers import WEATHER_PARAMETERS, Seen, serving, webhook_app

NAME = "grpcapi"
MODEL = f"tiny-{NAME}"
KEY = "em-grpc-test-key-0123456789"
ONE_STREAM_KEY = "em-grpc-one-stream-key-9876543210"     # a tenant with max_concurrent_streams 1
TOOLS_KEY = "em-grpc-tools-key-5555555555"                # a tenant with a server-side tool (a webhook)
METADATA = (("application", NAME), ("authorization", f"Bearer {KEY}"))
NO_THINKING = dict(enable_thinking=False)
WEATHER = pb.Tool(name="get_weather", description="Weather of a city", parameters=json.dumps({
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}}))
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
TIMEOUT = 120


@pytest.fixture(scope="module")
def seen():
    return Seen()


@pytest.fixture(scope="module")
def webhook_url(seen):
    with serving(webhook_app(seen), "webhook") as url:
        yield url


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory, webhook_url):
    # Two sequences and no queue: a third concurrent request is refused (RESOURCE_EXHAUSTED).
    # Tenants: every call but Health needs a key.
    config = tiny_config(NAME, chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3")),
                         engine={"max_num_seqs": 2, "max_queued_requests": 0},
                         tenants={"team-a": {"api_keys": [hash_key(KEY)]},
                                  "team-b": {"api_keys": [hash_key(ONE_STREAM_KEY)],
                                             "limits": {"max_concurrent_streams": 1}},
                                  "team-tools": {"api_keys": [hash_key(TOOLS_KEY)], "tools": {"webhooks": [{
                                      "name": "lookup_weather", "description": "Weather of a city",
                                      "url": webhook_url + "/weather", "parameters": WEATHER_PARAMETERS}]}}})
    with deployed(config, serve_url) as url:
        yield config, url


@pytest.fixture(scope="module")
def stub(app, grpc_address):
    with grpc.insecure_channel(grpc_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield pb_grpc.InferenceStub(channel)


def greedy(**sampling) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0, **sampling)


def generate(stub, **request) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(model=MODEL, **request), metadata=METADATA, timeout=TIMEOUT))


def chat(stub, content: str, **request) -> list[pb.ChatResponse]:
    messages = [pb.ChatMessage(role="user", content=content)]
    return list(stub.Chat(pb.ChatRequest(model=MODEL, messages=messages, **request), metadata=METADATA,
                          timeout=TIMEOUT))


# -- Generate --------------------------------------------------------------------------------------

def test_generate_from_text_equals_the_http_completions_tokens(stub, app):
    replies = generate(stub, text="Once upon a time", sampling=greedy(max_tokens=9, ignore_eos=True), logprobs=2)
    *steps, last = replies
    http = openai.OpenAI(base_url=app[1] + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    reference = http.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0,
                                        logprobs=2, extra_body={"ignore_eos": True})
    tokens = [t for r in steps for t in r.token_ids]
    assert len(tokens) == 9 == last.usage.completion_tokens
    assert "".join(r.text for r in steps) == reference.choices[0].text
    assert [lp.logprob for r in steps for lp in r.logprobs] == pytest.approx(
        reference.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert all(len(lp.top_logprobs) == 2 for r in steps for lp in r.logprobs)
    assert steps[-1].finish_reason == "length" and not any(r.finish_reason for r in steps[:-1])
    assert last.usage.prompt_tokens == reference.usage.prompt_tokens
    assert last.usage.total_tokens == reference.usage.total_tokens and not last.token_ids


def test_generate_from_token_ids_equals_generate_from_their_text(stub, app):
    from models.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(app[0].model.source, "qwen3_moe").encode("Once upon a time")
    sampling = greedy(max_tokens=6, ignore_eos=True)
    from_text, from_ids = (generate(stub, **prompt, sampling=sampling)
                           for prompt in ({"text": "Once upon a time"}, {"token_ids": pb.TokenIds(ids=ids)}))
    assert [t for r in from_ids for t in r.token_ids] == [t for r in from_text for t in r.token_ids]
    assert from_ids[-1].usage.prompt_tokens == len(ids) == from_text[-1].usage.prompt_tokens
    http = openai.OpenAI(base_url=app[1] + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    reference = http.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert "".join(r.text for r in from_ids) == reference.choices[0].text


# -- Chat ------------------------------------------------------------------------------------------

def test_chat_streams_a_tool_call_that_validates(stub):
    replies = chat(stub, "Weather in Paris?", tools=[WEATHER], tool_choice=pb.ToolChoice(mode="required"),
                   parallel_tool_calls=False, sampling=pb.SamplingParams(max_tokens=80, seed=0), **NO_THINKING)
    calls = [r.tool_call for r in replies if r.HasField("tool_call")]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), json.loads(WEATHER.parameters))
    assert not any(r.content for r in replies)
    finish, usage = replies[-2], replies[-1]
    assert finish.finish_reason == "tool_calls" and usage.usage.completion_tokens > 0


def test_chat_named_function_and_a_tool_round_trip(stub):
    replies = chat(stub, "Weather?", tools=[WEATHER], tool_choice=pb.ToolChoice(function="get_weather"),
                   sampling=pb.SamplingParams(max_tokens=80), **NO_THINKING)
    [call] = [r.tool_call for r in replies if r.HasField("tool_call")]
    messages = [pb.ChatMessage(role="user", content="Weather?"),
                pb.ChatMessage(role="assistant", tool_calls=[call]),
                pb.ChatMessage(role="tool", tool_call_id=call.id, content=json.dumps({"temperature": 21}))]
    second = list(stub.Chat(pb.ChatRequest(model=MODEL, messages=messages, tools=[WEATHER],
                                           sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
                                           **NO_THINKING), metadata=METADATA, timeout=TIMEOUT))
    assert second[-1].usage.prompt_tokens > replies[-1].usage.prompt_tokens + 10


@pytest.mark.parametrize("seed", [0, 1])
def test_chat_json_schema_output_validates_and_equals_http(stub, app, seed):
    fmt = pb.ResponseFormat(type="json_schema", name="person", json_schema=json.dumps(PERSON), strict=True)
    replies = chat(stub, "A person as JSON", response_format=fmt, sampling=pb.SamplingParams(max_tokens=80, seed=seed),
                   **NO_THINKING)
    content = "".join(r.content for r in replies)
    jsonschema.validate(json.loads(content), PERSON)
    assert [r.finish_reason for r in replies if r.finish_reason] == ["stop"]
    assert not any(r.reasoning for r in replies)
    http = openai.OpenAI(base_url=app[1] + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    reference = http.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=80, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert content == reference.choices[0].message.content


def test_chat_reasoning_streams_apart_from_content(stub):
    # Random weights rarely close </think>; thinking_token_budget makes the grammar do it.
    fmt = pb.ResponseFormat(type="json_schema", json_schema=json.dumps(PERSON))
    replies = chat(stub, "A person", response_format=fmt, thinking_token_budget=6,
                   sampling=pb.SamplingParams(max_tokens=100, seed=3))
    reasoning = "".join(r.reasoning for r in replies)
    assert reasoning
    first_content = next(i for i, r in enumerate(replies) if r.content)
    assert not any(r.reasoning for r in replies[first_content:])
    jsonschema.validate(json.loads("".join(r.content for r in replies)), PERSON)
    hidden = chat(stub, "A person", response_format=fmt, thinking_token_budget=6, include_reasoning=False,
                  sampling=pb.SamplingParams(max_tokens=100, seed=3))
    assert not any(r.reasoning for r in hidden)


def test_chat_runs_server_side_tools_as_the_http_api_does(stub, app, seen):
    metadata = METADATA[:1] + (("authorization", f"Bearer {TOOLS_KEY}"),)
    question = "Weather in Paris?"
    replies = list(stub.Chat(pb.ChatRequest(
        model=MODEL, messages=[pb.ChatMessage(role="user", content=question)],
        tool_choice=pb.ToolChoice(function="lookup_weather"), sampling=greedy(max_tokens=60), enable_thinking=False),
        metadata=metadata, timeout=TIMEOUT))
    started, done = [r.server_tool_call for r in replies if r.HasField("server_tool_call")]
    assert (started.status, done.status) == ("in_progress", "completed") and started.id == done.id
    assert started.name == "lookup_weather" and not started.HasField("output")
    arguments = json.loads(started.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    assert seen.calls == [("/weather", arguments)]                        # the webhook ran it, once
    assert json.loads(done.output) == {"city": arguments["city"], "temperature_c": 21}
    assert not any(r.HasField("tool_call") for r in replies)              # not a call for the client
    # The same request over HTTP: the same call, the same answer, the same two steps' tokens.
    http = openai.OpenAI(base_url=app[1] + "/v1", api_key=TOOLS_KEY, max_retries=0, timeout=TIMEOUT)
    reference = http.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "lookup_weather"}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    [call] = reference.choices[0].message.model_extra["server_tool_calls"]
    assert call["function"]["arguments"] == started.arguments and call["output"] == done.output
    assert "".join(r.content for r in replies) == (reference.choices[0].message.content or "")
    assert [r.finish_reason for r in replies if r.finish_reason] == [reference.choices[0].finish_reason]
    assert replies[-1].usage.prompt_tokens == reference.usage.prompt_tokens
    assert replies[-1].usage.completion_tokens == reference.usage.completion_tokens


# -- ListModels, Health, reflection ----------------------------------------------------------------

def test_list_models_and_health(stub, app):
    [model] = stub.ListModels(pb.ListModelsRequest(), metadata=METADATA, timeout=TIMEOUT).models
    assert model.id == MODEL and model.root == str(app[0].model.source) and model.owned_by == "expertmesh"
    health = stub.Health(pb.HealthRequest(), metadata=METADATA, timeout=TIMEOUT)
    assert health.status == pb.HealthResponse.SERVING and health.model == MODEL
    assert health.max_model_len == 512 and health.expert_groups == 1 and health.transport == "local"


def test_reflection_lists_and_describes_the_service(grpc_address):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "expertmesh.v1.Inference" in database.get_services()
        service = DescriptorPool(database).FindServiceByName("expertmesh.v1.Inference")
        methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {"Generate": ("GenerateRequest", "GenerateResponse", True),
                       "Chat": ("ChatRequest", "ChatResponse", True),
                       "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
                       "Health": ("HealthRequest", "HealthResponse", False)}


# -- errors ----------------------------------------------------------------------------------------

def status(call) -> grpc.RpcError:
    """The error `call()` ends with (a stream's comes while it is read: list it in `call`)."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def test_bad_requests_are_invalid_argument_naming_the_problem(stub):
    cases = {
        "temperature": dict(text="Hi", sampling=pb.SamplingParams(temperature=5)),
        "prompt is empty": dict(text=""),
        "context length": dict(text="Hi " * 600),
    }
    for needle, request in cases.items():
        error = status(lambda: generate(stub, **request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details(), error
    error = status(lambda: chat(stub, "Hi", tools=[pb.Tool(name="f", parameters="{not json")]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools.0.parameters" in error.details()
    error = status(lambda: chat(stub, "Hi", tool_choice=pb.ToolChoice(mode="sometimes")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool_choice" in error.details()
    error = status(lambda: list(stub.Chat(pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="robot")]),
                                          metadata=METADATA, timeout=TIMEOUT)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "robot" in error.details()


def test_unknown_model_is_not_found(stub):
    error = status(lambda: list(stub.Generate(pb.GenerateRequest(model="gpt-5", text="Hi"), metadata=METADATA,
                                              timeout=TIMEOUT)))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "gpt-5" in error.details() and MODEL in error.details()


# -- load: cancelled streams and a full router ------------------------------------------------------

def wait_idle(config, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = router_stats(config)
        if stats["active_requests"] == 0 and stats["engine_requests"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def long_generation(stub, metadata=METADATA):
    return stub.Generate(pb.GenerateRequest(model=MODEL, text="Once upon a time",
                                            sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True)),
                         metadata=metadata, timeout=TIMEOUT)


def test_cancelled_stream_aborts_the_request_and_frees_kv_blocks(stub, app):
    config = app[0]
    idle = wait_idle(config)
    call = long_generation(stub)
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert router_stats(config)["engine_requests"] == 1
    call.cancel()
    stats = wait_idle(config)
    assert stats["active_requests"] == 0 and stats["engine_requests"] == 0
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"] == idle["total_kv_blocks"]


def test_full_router_is_resource_exhausted_with_retry_after(stub, app):
    config = app[0]
    running = [long_generation(stub) for _ in range(config.engine.capacity)]
    try:
        for call in running:
            next(call)                                   # each is in the engine
        error = status(lambda: list(long_generation(stub)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in error.details()
        assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
    finally:
        for call in running:
            call.cancel()
    assert wait_idle(config)["engine_requests"] == 0


def test_a_missing_or_unknown_key_is_unauthenticated(stub):
    application = METADATA[:1]
    cases = {(): "didn't provide an API key", (("authorization", "Bearer em-not-a-key"),): "Incorrect API key",
             (("authorization", KEY),): "Bearer YOUR_KEY"}
    for extra, needle in cases.items():
        metadata = application + extra
        for call in (lambda: list(stub.Generate(pb.GenerateRequest(model=MODEL, text="Hi"), metadata=metadata,
                                                timeout=TIMEOUT)),
                     lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=TIMEOUT)):
            error = status(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and needle in error.details(), error
    # Health stays open, as /health and /ready do.
    assert stub.Health(pb.HealthRequest(), metadata=application, timeout=TIMEOUT).status == \
        pb.HealthResponse.SERVING


def test_a_tenant_limit_is_resource_exhausted_over_grpc_too(stub, app):
    metadata = METADATA[:1] + (("authorization", f"Bearer {ONE_STREAM_KEY}"),)
    first = long_generation(stub, metadata)
    try:
        next(first)
        error = status(lambda: list(long_generation(stub, metadata)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_streams" in error.details()
        assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
    finally:
        first.cancel()
    assert wait_idle(app[0])["engine_requests"] == 0
