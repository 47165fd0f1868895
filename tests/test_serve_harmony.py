"""gpt-oss through the Serve app: harmony prompts, the analysis channel as reasoning_content, tool
calls from the commentary channel, and tool results rendered back. A tiny random gpt-oss with the
o200k_harmony vocabulary; its output is steered by the constraint (analysis, then the answer)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from deployments.chat import ChatFormat
from deployments.protocol import ChatCompletionRequest
from models.tokenizer import Tokenizer
from tests import chat_checkpoints
from tests.serving import deployed, tiny_config

MODEL = "tiny-oss"
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]}}}}}
BUDGET = {"thinking_token_budget": 5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoints.gpt_oss(tmp_path_factory.mktemp("gpt-oss"))


@pytest.fixture(scope="module")
def client(serve_url, checkpoint):
    with deployed(tiny_config("oss", checkpoint), serve_url) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_reasoning_effort_goes_into_the_harmony_system_message(checkpoint):
    chat = ChatFormat(Tokenizer.from_pretrained(checkpoint, "gpt_oss"), "gpt_oss")
    request = ChatCompletionRequest(model=MODEL, messages=[{"role": "system", "content": "Be terse."},
                                                           {"role": "user", "content": "Hi"}],
                                    reasoning_effort="high")
    text = chat.render(request).text
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: high" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe terse.<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_analysis_is_reasoning_and_final_is_content(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], max_tokens=60, seed=1,
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
    message = client.chat.completions.create(**kwargs, extra_body=BUDGET).choices[0].message
    assert message.reasoning_content
    jsonschema.validate(json.loads(message.content), ANSWER)
    assert "<|" not in message.content and "<|" not in message.reasoning_content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body=BUDGET))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
    hidden = client.chat.completions.create(**kwargs, extra_body={**BUDGET, "include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None


def test_tool_call_from_the_commentary_channel_and_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=60, extra_body=BUDGET)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert choice.message.reasoning_content
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4,
                                            extra_body={"ignore_eos": True})
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    named = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           stream=True, extra_body=BUDGET)
    calls = [d for c in named if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
