"""The OpenAI HTTP API of a real Serve app (tiny Qwen3-MoE checkpoint), through the official client.

Random weights write junk, so the tests check what does not depend on the words: shapes, counts,
finish reasons, stop strings cut where they should, outputs that the constraint makes valid against
a JSON schema (checked by `jsonschema`), and errors with the right status."""
from __future__ import annotations

import asyncio
import json
import time

import urllib.request
import jsonschema
import openai
import pytest

from tests import chat_checkpoints
from tests.serving import deployed, router_stats, tiny_config

MODEL = "tiny-qwen"
HELLO = [{"role": "user", "content": "Hello!"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                                       "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 150}}}


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    config = tiny_config("qwen", chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3")))
    with deployed(config, serve_url) as url:
        yield config, url


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(app) -> openai.AsyncOpenAI:
    """One per test: an async client belongs to the event loop of the test that uses it."""
    return openai.AsyncOpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def tool_schema(name: str) -> dict:
    return {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}[name]


# -- chat ------------------------------------------------------------------------------------------

def test_chat_completion_counts_and_finish_reason(client):
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert isinstance(choice.message.content, str)


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_completion_tokens=12, temperature=0.8, seed=11,
                  extra_body={"ignore_eos": True, **NO_THINKING})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_seeds_and_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6, temperature=1.0,
                                              seed=5, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 18
    for choice in response.choices:
        entries = choice.logprobs.content
        assert len(entries) == 6
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.logprob
    again = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6, temperature=1.0, seed=5,
                                           extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    assert len({c.message.content for c in response.choices}) > 1


def test_stop_string_cuts_the_output(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, extra_body={"ignore_eos": True,
                                                                                           **NO_THINKING})
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]


async def test_async_client_streams(app):
    stream = await async_client(app).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True,
                                                        extra_body={"ignore_eos": True})
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


# -- completions, models, health -------------------------------------------------------------------

def test_completions_text_tokens_and_stream(client):
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, temperature=0,
                                         logprobs=2, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 7
    assert len(choice.logprobs.tokens) == 7 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    by_ids = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert len(by_ids.choices) == 2 and by_ids.usage.prompt_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=7, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == choice.text


def test_models_health_ready(client, app):
    assert [m.id for m in client.models.list().data] == [MODEL]
    base = app[1]
    with urllib.request.urlopen(base + "/health") as health:
        assert health.status == 200
    with urllib.request.urlopen(base + "/ready") as ready:
        assert ready.status == 200 and json.loads(ready.read())["max_model_len"] == 512


# -- errors ----------------------------------------------------------------------------------------

def test_errors_have_openai_bodies_and_statuses(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=7)
    assert "temperature" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"temprature": 0.5})
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=HELLO, top_logprobs=2)


def test_logit_bias_forces_a_token_and_bad_biases_are_400s(client):
    import quicktok      # the checkpoint has no tokenizer files: it speaks quicktok's qwen3 encoding

    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={"42": 100})
    assert forced.choices[0].text == quicktok.get_encoding("qwen3").decode([42] * 4)
    with pytest.raises(openai.BadRequestError, match="logit_bias names token 10000000"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, logit_bias={"10000000": 5})
    with pytest.raises(openai.BadRequestError, match=r"logit_bias\[5\] must be in \[-100, 100\]"):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, logit_bias={"5": 500})


def test_context_too_long_names_both_counts_unless_truncation_is_asked(client):
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(30):
        history += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 5},
                    {"role": "assistant", "content": "Sure, " + "more words " * 5}]
    history.append({"role": "user", "content": "Last question?"})
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=history, max_tokens=100)
    message = error.value.body["message"]
    assert error.value.body["code"] == "context_length_exceeded"
    assert "512 tokens" in message and "100 in the completion" in message
    prompt_tokens = int(message.split("(")[1].split(" in the messages")[0])
    assert prompt_tokens + 100 > 512
    ok = client.chat.completions.create(model=MODEL, messages=history, max_tokens=100,
                                        extra_body={"truncation": "auto", "ignore_eos": True})
    assert ok.usage.prompt_tokens + 100 <= 512 and ok.usage.completion_tokens == 100


# -- structured output -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(client, seed):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=80, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        extra_body=NO_THINKING)
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
    assert getattr(response.choices[0].message, "reasoning_content", None) is None   # thinking is off


def test_schema_that_cannot_compile_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object",
                                                                              "properties": {"x": {"type": "nope"}}}}})
    assert "nope" in error.value.body["message"]


def test_qwen3_reasoning_goes_to_reasoning_content(client):
    # Random weights rarely close </think> by themselves; thinking_token_budget makes the grammar do it.
    # Qwen3's template has thinking on by default: the output opens <think> before the answer.
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "A person"}], max_tokens=100, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    message = client.chat.completions.create(**kwargs, extra_body={"thinking_token_budget": 6}).choices[0].message
    assert message.reasoning_content
    jsonschema.validate(json.loads(message.content), PERSON)       # the think block is not in content
    hidden = client.chat.completions.create(**kwargs, extra_body={"thinking_token_budget": 6,
                                                                  "include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None
    assert hidden.choices[0].message.content == message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body={"thinking_token_budget": 6}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == message.reasoning_content and content == message.content
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert not any(getattr(d, "reasoning_content", None) for d in deltas[first_content:])


# -- tool calls ------------------------------------------------------------------------------------

def check_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool_schema(call.function.name))
    return arguments


def test_required_tool_call_is_valid(client):
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
            tool_choice="required", max_tokens=120, seed=seed, extra_body=NO_THINKING)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call)


def test_named_tool_choice_and_no_parallel_calls(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, TIME], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, extra_body=NO_THINKING)
    [call] = response.choices[0].message.tool_calls
    check_call(call, names=("get_time",))
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_parallel_tool_calls(client):
    counts = set()
    for seed in range(3):
        # min_tokens holds back the end of the turn, so the grammar's only way on is another call.
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather and time?"}], tools=[WEATHER, TIME],
            tool_choice="required", parallel_tool_calls=True, max_tokens=200, seed=seed,
            extra_body={"min_tokens": 40, **NO_THINKING})
        calls = response.choices[0].message.tool_calls
        assert response.choices[0].finish_reason == "tool_calls"
        for call in calls:
            check_call(call)
        assert len({c.id for c in calls}) == len(calls)
        counts.add(len(calls))
    assert max(counts) >= 2, counts


def test_streamed_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, stream=True, extra_body=NO_THINKING))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), tool_schema("get_weather"))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_tool_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, extra_body=NO_THINKING)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=5,
                                            extra_body={"ignore_eos": True, **NO_THINKING})
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert second.choices[0].finish_reason in ("length", "tool_calls", "stop")


def test_auto_tool_choice_never_fails(client):
    response = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], tool_choice="auto",
                                              max_tokens=20, seed=1)
    message = response.choices[0].message
    assert message.content is not None or message.tool_calls


# -- load: disconnects and a full queue ---------------------------------------------------------------

def wait_idle(config, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = router_stats(config)
        if stats["active_requests"] == 0 and stats["engine_requests"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_client_disconnect_aborts_and_frees_kv_blocks(client, app):
    config = app[0]
    idle = wait_idle(config)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert router_stats(config)["engine_requests"] == 1
    stream.close()
    stats = wait_idle(config)
    assert stats["active_requests"] == 0 and stats["engine_requests"] == 0
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"] == idle["total_kv_blocks"]


async def test_full_queue_answers_429_with_retry_after(app):
    config, client = app[0], async_client(app)
    capacity = config.engine.capacity

    async def one():
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, max_tokens=48, extra_body={"ignore_eos": True})
            return raw.parse().usage.completion_tokens
        except openai.RateLimitError as error:
            assert int(error.response.headers["retry-after"]) >= 1
            assert error.body["code"] == "queue_full"
            return "429"

    results = await asyncio.gather(*[one() for _ in range(3 * capacity)])
    assert set(results) == {48, "429"}, results
    assert results.count(48) >= capacity
    stats = await asyncio.to_thread(wait_idle, config)
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"]
