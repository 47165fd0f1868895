"""The Responses API (`/v1/responses`) of a real Serve app with the SQLite session store, through the
official openai client: plain text, instructions, conversations continued with previous_response_id,
a function-call round trip, the streaming events, store: false, delete, 404s, 400s that name the
problem, and the long-conversation policies summarize and error.

Random weights write junk, so what the model saw is checked by token counts: the input tokens a
response reports equal the prompt the test renders itself from the messages a chat client would
have sent (the checkpoint's chat template, through the project's tokenizer)."""
from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest

from tests import chat_checkpoints
from tests.conversations import LONG, prompt_counter
from tests.serving import deployed, router_stats, tiny_config

MODEL = "tiny-responses"
NO_THINKING = {"effort": "none"}                 # Qwen3's enable_thinking: false
FIXED = {"ignore_eos": True}                     # exactly max_output_tokens tokens
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 12}}}}
KEEP_TURNS = 1
SUMMARY_MAX_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3-responses"))


@pytest.fixture(scope="module")
def app(serve_url, checkpoint, tmp_path_factory):
    config = tiny_config("responses", checkpoint, sessions={
        "data_dir": str(tmp_path_factory.mktemp("sessions")), "context_policy": "summarize",
        "keep_turns": KEEP_TURNS, "summary_max_tokens": SUMMARY_MAX_TOKENS})
    with deployed(config, serve_url) as url:
        yield config, url


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def prompt_tokens(checkpoint):
    return prompt_counter(checkpoint)


def create(client, **kwargs):
    kwargs.setdefault("reasoning", NO_THINKING)
    return client.responses.create(model=MODEL, **kwargs)


# -- one response ---------------------------------------------------------------------------------

def test_plain_text_and_instructions(client, prompt_tokens):
    response = create(client, input="Hello there!", max_output_tokens=8, temperature=0, extra_body=FIXED)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" or response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage.output_tokens == 8 and usage.total_tokens == usage.input_tokens + 8
    assert usage.input_tokens == prompt_tokens([{"role": "user", "content": "Hello there!"}])

    instructed = create(client, input="Hello there!", instructions="Answer in French.", max_output_tokens=4)
    assert instructed.instructions == "Answer in French."
    assert instructed.usage.input_tokens == prompt_tokens([{"role": "system", "content": "Answer in French."},
                                                           {"role": "user", "content": "Hello there!"}])


def test_greedy_output_is_reproducible_and_metadata_comes_back(client):
    kwargs = dict(input="Count to three.", max_output_tokens=6, temperature=0, extra_body=FIXED)
    first, second = create(client, **kwargs), create(client, **kwargs, metadata={"ticket": "T-1"})
    assert first.output_text == second.output_text
    assert second.metadata == {"ticket": "T-1"}
    assert client.responses.retrieve(second.id).metadata == {"ticket": "T-1"}


# -- conversations --------------------------------------------------------------------------------

def test_previous_response_id_continues_the_conversation(client, prompt_tokens):
    first = create(client, input="My name is Ada and I like long walks along the river.", instructions="Be brief.",
                   max_output_tokens=6, temperature=0, extra_body=FIXED)
    second = create(client, input="What is my name?", previous_response_id=first.id, max_output_tokens=6,
                    instructions="Be brief.", temperature=0, extra_body=FIXED)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == prompt_tokens([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada and I like long walks along the river."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    # The earlier prompt's blocks are in the router's prefix cache: the conversation stayed together.
    assert second.usage.input_tokens_details.cached_tokens > 0
    # Instructions are not carried over (as OpenAI does); earlier inputs and outputs are.
    third = create(client, input="And what do I like?", previous_response_id=second.id, max_output_tokens=4)
    assert third.usage.input_tokens == prompt_tokens([
        {"role": "user", "content": "My name is Ada and I like long walks along the river."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "And what do I like?"}])

    stored = client.responses.retrieve(second.id)
    assert stored.output_text == second.output_text and stored.usage.input_tokens == second.usage.input_tokens
    assert stored.previous_response_id == first.id and stored.status == second.status


def test_function_call_round_trip(client, prompt_tokens):
    call_response = create(client, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                           max_output_tokens=60)
    calls = [item for item in call_response.output if item.type == "function_call"]
    assert len(calls) == 1 and call_response.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    answer = create(client, previous_response_id=call_response.id, tools=[WEATHER], max_output_tokens=5,
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}],
                    extra_body=FIXED)
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert answer.usage.input_tokens == prompt_tokens([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"celsius": 21}'}], tools=tools)

    # The same turn without the store: the client sends the items back itself.
    stateless = create(client, store=False, tools=[WEATHER], max_output_tokens=5, extra_body=FIXED, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}])
    assert stateless.usage.input_tokens == answer.usage.input_tokens


def test_streaming_events_in_order(client):
    # Thinking on: a reasoning item, then (thinking_token_budget closes the block) the forced call.
    stream = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=80, stream=True, extra_body={"thinking_token_budget": 5})
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    reasoning, call = final.output

    def of(item_id):
        return [e.type for e in events if getattr(e, "item_id", None) == item_id
                or getattr(getattr(e, "item", None), "id", None) == item_id]

    reasoning_events = of(reasoning.id)
    assert reasoning_events[:2] == ["response.output_item.added", "response.content_part.added"]
    assert set(reasoning_events[2:-3]) == {"response.reasoning_text.delta"}
    assert reasoning_events[-3:] == ["response.reasoning_text.done", "response.content_part.done",
                                     "response.output_item.done"]
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text and text == reasoning.content[0].text
    assert of(call.id) == ["response.output_item.added", "response.function_call_arguments.delta",
                           "response.function_call_arguments.done", "response.output_item.done"]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    assert client.responses.retrieve(final.id).output[1].arguments == call.arguments


def test_streamed_text_equals_the_stored_response(client):
    events = list(create(client, input="Tell me a story.", max_output_tokens=10, temperature=0, stream=True,
                         extra_body=FIXED))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == client.responses.retrieve(final.id).output_text
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"


def test_leaving_mid_stream_aborts_the_generation_and_stores_nothing(client, app):
    stream = create(client, input="Tell me everything.", max_output_tokens=400, stream=True, extra_body=FIXED)
    events = [event for _, event in zip(range(6), stream)]
    response_id = events[0].response.id
    assert router_stats(app[0])["engine_requests"] == 1
    stream.close()
    deadline = time.monotonic() + 60
    while (stats := router_stats(app[0]))["engine_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["engine_requests"] == 0 and stats["free_kv_blocks"] == stats["total_kv_blocks"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response_id)


# -- storage ----------------------------------------------------------------------------------------

def test_store_false_is_not_retrievable_nor_continuable(client):
    response = create(client, input="Forget this.", store=False, max_output_tokens=3)
    assert response.store is False
    with pytest.raises(openai.NotFoundError, match=response.id):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError, match=response.id):
        create(client, input="Hi", previous_response_id=response.id, max_output_tokens=3)


def test_delete_and_404s(client):
    response = create(client, input="Delete me.", max_output_tokens=3)
    client.responses.delete(response.id)
    for call in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id),
                 lambda: create(client, input="Hi", previous_response_id=response.id, max_output_tokens=3)):
        with pytest.raises(openai.NotFoundError, match=response.id):
            call()
    with pytest.raises(openai.NotFoundError, match="resp_nope"):
        client.responses.retrieve("resp_nope")


def test_a_deleted_earlier_turn_breaks_the_chain_with_a_clear_error(client):
    first = create(client, input="One.", max_output_tokens=2)
    second = create(client, input="Two.", previous_response_id=first.id, max_output_tokens=2)
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError, match=f"{first.id}.*was deleted"):
        create(client, input="Three.", previous_response_id=second.id, max_output_tokens=2)


# -- bad requests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
    ({"tools": [{"type": "web_search"}]}, "web_search"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "flat"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"include": ["reasoning.encrypted_content"]}, "reasoning.encrypted_content"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input_image"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "web_search_call"),
    ({"reasoning": {"effort": "low", "summary": "auto"}}, "summar"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
])
def test_unsupported_fields_are_400s_that_name_them(client, kwargs, named):
    kwargs.setdefault("input", "Hi")
    with pytest.raises(openai.BadRequestError, match=named):
        create(client, max_output_tokens=2, **kwargs)


def test_wrong_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.responses.create(model="gpt-nope", input="Hi")


def test_json_schema_text_format(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 10}}}
    response = create(client, input="A city, as JSON.", max_output_tokens=40,
                      text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


# -- long conversations -----------------------------------------------------------------------------

def test_error_policy_names_both_token_counts(client):
    first = create(client, input=LONG * 3, max_output_tokens=4)
    assert first.usage.input_tokens < 300
    with pytest.raises(openai.BadRequestError) as error:
        create(client, input=LONG * 3, previous_response_id=first.id, max_output_tokens=4, truncation="disabled")
    message = error.value.body["message"]
    assert "maximum context length is 512 tokens" in message and "max_output_tokens asks for 4" in message
    assert error.value.body["code"] == "context_length_exceeded"


def test_summarize_condenses_the_oldest_turns_and_later_turns_build_on_the_note(client, prompt_tokens):
    turns, previous = [], None
    for i in range(6):
        response = create(client, input=f"Part {i}. {LONG}", previous_response_id=previous, max_output_tokens=4,
                          temperature=0, extra_body=FIXED)
        turns.append(response)
        previous = response.id
        if response.context_management:
            break
    else:
        pytest.fail("the conversation never outgrew the context")
    report, shortened = response.context_management, len(turns) - 1
    assert report["policy"] == "summarize" and report["turns_removed"] == shortened - KEEP_TURNS
    assert report["tokens_removed"] > 0 and 0 < report["summary_tokens"] <= SUMMARY_MAX_TOKENS + 16
    summary = report["summary"]
    kept = [m for t in range(shortened - KEEP_TURNS, shortened) for m in (
        {"role": "user", "content": f"Part {t}. {LONG}"}, {"role": "assistant", "content": turns[t].output_text})]
    note = {"role": "system", "content": "Summary of the earlier conversation:\n" + summary}
    assert response.usage.input_tokens == prompt_tokens([note, *kept, {"role": "user",
                                                                        "content": f"Part {shortened}. {LONG}"}])
    # The next turn starts from the stored note, not from the full history.
    after = create(client, input="Thanks.", previous_response_id=response.id, max_output_tokens=4)
    assert after.context_management is None
    assert after.usage.input_tokens == prompt_tokens([
        note, *kept, {"role": "user", "content": f"Part {shortened}. {LONG}"},
        {"role": "assistant", "content": response.output_text}, {"role": "user", "content": "Thanks."}])
    assert client.responses.retrieve(response.id).context_management["summary"] == summary
