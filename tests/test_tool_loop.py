"""The server-side tool loop through a real Serve app (tiny random Qwen3-MoE), the official openai
client, a real MCP server (the `mcp` SDK, streamable HTTP) and a real webhook server on loopback
(tests/tool_servers.py).

Random weights write junk, so the loop is driven by constrained decoding: a named tool_choice forces
one call of that tool (later steps are `auto`, and the model answers), `required` forces a call at
every step (the step limit ends it). What the model saw is checked by token counts: the prompt
tokens a response reports are the sum of its steps' prompts, which the test renders itself from
the messages the loop must have built (the checkpoint's template, the project's tokenizer)."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ToolsSection
from deployments.server_tools import ToolRegistry
from tests import chat_checkpoints
from tests.conversations import prompt_counter
from tests.serving import deployed, tiny_config
from tests.tool_servers import WEATHER_PARAMETERS, Seen, mcp_app, serving, webhook_app

MODEL = "tiny-tools"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
MAX_STEPS = 2
CLIENT_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                   "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}


@pytest.fixture(scope="module")
def seen():
    return Seen()


@pytest.fixture(scope="module")
def servers(seen):
    with serving(mcp_app(seen), "mcp") as mcp_url, serving(webhook_app(seen), "webhook") as webhook_url:
        yield mcp_url, webhook_url


@pytest.fixture(scope="module")
def tools_config(servers) -> dict:
    mcp_url, webhook_url = servers
    return {"mcp_servers": [{"server_label": "tools", "server_url": mcp_url + "/mcp",
                             "allowed_tools": ["echo", "add", "fail"], "timeout_s": 10}],
            "webhooks": [{"name": "get_weather", "description": "Weather of a city", "url": webhook_url + "/weather",
                          "parameters": WEATHER_PARAMETERS}],
            "allowed_mcp_hosts": ["127.0.0.1"], "max_tool_steps": MAX_STEPS}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3-tools"))


@pytest.fixture(scope="module")
def app(serve_url, checkpoint, tools_config, tmp_path_factory):
    # The tools' definitions alone take ~400 prompt tokens: the model's whole 1024-token context.
    config = tiny_config("tools", checkpoint, tools=tools_config, model={"max_model_len": 1024},
                         sessions={"data_dir": str(tmp_path_factory.mktemp("tool-sessions"))})
    with deployed(config, serve_url) as url:
        yield config, url


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def server_tools(tools_config) -> list[dict]:
    """The server-side tools as the ingress renders them, listed from the same servers."""
    tools = asyncio.run(ToolRegistry(ToolsSection.model_validate(tools_config)).resolve("default"))
    return tools.definitions()


@pytest.fixture(scope="module")
def prompt_tokens(checkpoint):
    return prompt_counter(checkpoint)


@pytest.fixture(autouse=True)
def fresh(seen):
    seen.clear()


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def step_messages(messages: list[dict], calls) -> list[dict]:
    """The conversation after a step of server-side calls: the assistant's calls, then their results."""
    return [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": c.output if c.output is not None else f"Error: {c.error}"}
          for c in calls)]


def server_calls(message) -> list:
    """The `server_tool_calls` extension of a chat message, as attribute objects."""
    return [_Call(c) for c in (message.model_extra or {}).get("server_tool_calls", [])]


class _Call:
    def __init__(self, raw: dict):
        self.raw, self.id, self.status = raw, raw["id"], raw["status"]
        self.server_label, self.output, self.error = raw["server_label"], raw["output"], raw["error"]
        self.function = type("Function", (), raw["function"])


# -- chat completions ---------------------------------------------------------------------------------

def test_chat_one_server_call_then_an_answer(client, seen, server_tools, prompt_tokens):
    messages = [{"role": "user", "content": "Echo hello"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, tool_choice=named("echo"),
                                              max_tokens=80, temperature=0, extra_body=NO_THINKING)
    choice = response.choices[0]
    [call] = server_calls(choice.message)
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "echo" and call.server_label == "tools" and call.status == "completed"
    assert call.output == f"echo: {arguments['text']}" and call.error is None
    assert seen.calls == [("echo", arguments)]                   # the MCP server ran it
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    # Two steps: the call, then the answer, whose prompt holds the call and its result.
    assert response.usage.prompt_tokens == (prompt_tokens(messages, server_tools)
                                            + prompt_tokens(step_messages(messages, [call]), server_tools))


def test_chat_each_of_n_choices_runs_its_own_calls(client, seen):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add"}], n=2,
                                              tool_choice=named("add"), max_tokens=40, seed=7, extra_body=NO_THINKING)
    assert [c.index for c in response.choices] == [0, 1]
    sums = []
    for choice in response.choices:
        [call] = server_calls(choice.message)
        arguments = json.loads(call.function.arguments)
        assert call.output == str(arguments["a"] + arguments["b"])
        sums.append(arguments)
    assert sorted(map(str, (args for _, args in seen.calls))) == sorted(map(str, sums))


def test_chat_streams_each_server_call_as_it_happens(client, seen):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tool_choice=named("get_weather"),
        max_tokens=60, stream=True, stream_options={"include_usage": True}, extra_body=NO_THINKING))
    deltas = [c for chunk in chunks if chunk.choices
              for c in (chunk.choices[0].delta.model_extra or {}).get("server_tool_calls", [])]
    assert [d["status"] for d in deltas] == ["in_progress", "completed"]
    started, done = deltas
    assert started["function"]["name"] == "get_weather" and started["server_label"] == "webhook"
    assert done["id"] == started["id"] and done["index"] == started["index"] == 0
    [(path, posted)] = seen.calls
    assert path == "/weather" and posted == json.loads(started["function"]["arguments"])
    assert json.loads(done["output"]) == {"city": posted["city"], "temperature_c": 21}
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_chat_parallel_calls_and_the_step_limit(client, seen):
    # required: every step calls (min_tokens holds the turn open, so a step makes several calls);
    # the step limit ends the request, and the calls of the step past it are not run.
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Use the tools"}], tool_choice="required",
        max_tokens=400, seed=3, extra_body={"min_tokens": 40, **NO_THINKING})
    choice = response.choices[0]
    calls = server_calls(choice.message)
    assert choice.finish_reason == "max_tool_steps"
    ran = [c for c in calls if c.status != "incomplete"]
    assert len(ran) > MAX_STEPS                                  # at least one step called twice
    assert calls[-1].status == "incomplete" and calls[-1].output is None
    assert len(seen.calls) == len(ran)
    for call in ran:
        assert (call.output is None) != (call.error is None)


def test_chat_failing_tool_is_an_answer(client, seen):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Fail please"}], tool_choice=named("fail"),
        max_tokens=60, extra_body=NO_THINKING)
    [call] = server_calls(response.choices[0].message)
    assert call.status == "failed" and call.output is None and "failed on purpose" in call.error
    assert response.choices[0].finish_reason in ("stop", "length")


def test_chat_client_tool_mixed_with_server_tools(client, seen):
    # The client's function goes back to the client as today; the server-side tools stay offered.
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Time?"}], tools=[CLIENT_TOOL],
        tool_choice=named("get_time"), max_tokens=60, extra_body=NO_THINKING)
    choice = response.choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and choice.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), CLIENT_TOOL["function"]["parameters"])
    assert server_calls(choice.message) == [] and seen.calls == []

    with pytest.raises(openai.BadRequestError, match="function tool 'echo' has the name of a tool of the MCP server"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       tools=[{"type": "function", "function": {"name": "echo"}}])


# -- metrics -------------------------------------------------------------------------------------------

def test_tool_calls_and_latency_are_exported(client, metrics_url):
    for name in ("echo", "fail"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go"}],
                                       tool_choice=named(name), max_tokens=40, extra_body=NO_THINKING)
    wanted = {("tools", "echo", "ok"), ("tools", "fail", "error")}
    deadline = time.monotonic() + 60
    while True:
        calls, latency = {}, {}
        for family in text_string_to_metric_families(urllib.request.urlopen(metrics_url, timeout=30).read().decode()):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != MODEL:
                    continue
                if sample.name == "ray_expertmesh_tool_calls_total":
                    calls[labels["server"], labels["tool"], labels["outcome"]] = sample.value
                elif sample.name == "ray_expertmesh_tool_call_latency_seconds_count":
                    latency[labels["server"], labels["tool"]] = sample.value
        if all(calls.get(key, 0) >= 1 for key in wanted) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(calls.get(key, 0) >= 1 for key in wanted), calls
    assert latency.get(("tools", "echo"), 0) >= 1 and latency.get(("tools", "fail"), 0) >= 1, latency
    assert {server for server, _, _ in calls} <= {"tools", "webhook", "request"}


# -- the Responses API ------------------------------------------------------------------------------------

NONE = {"effort": "none"}                         # Qwen3's enable_thinking: false


def respond(client, **kwargs):
    kwargs.setdefault("reasoning", NONE)
    return client.responses.create(model=MODEL, **kwargs)


def function(name: str) -> dict:
    return {"type": "function", "name": name}


def test_responses_streams_mcp_items_then_the_answer(client, seen):
    events = list(respond(client, input="Echo hello", tool_choice=function("echo"), max_output_tokens=60,
                          stream=True))
    final = events[-1].response
    assert events[-1].type in ("response.completed", "response.incomplete")
    listing, call, message = final.output
    assert (listing.type, listing.server_label, listing.error) == ("mcp_list_tools", "tools", None)
    assert {t.name for t in listing.tools} == {"echo", "add", "fail"}
    assert call.type == "mcp_call" and call.server_label == "tools" and call.name == "echo"
    assert call.status == "completed" and call.error is None
    assert call.output == f"echo: {json.loads(call.arguments)['text']}" and seen.calls == [("echo", json.loads(call.arguments))]
    assert message.type == "message"

    def of(item_id):
        return [e.type for e in events if getattr(e, "item_id", None) == item_id
                or getattr(getattr(e, "item", None), "id", None) == item_id]

    assert of(listing.id) == ["response.output_item.added", "response.mcp_list_tools.in_progress",
                              "response.mcp_list_tools.completed", "response.output_item.done"]
    assert of(call.id) == ["response.output_item.added", "response.mcp_call_arguments.delta",
                           "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
                           "response.mcp_call.completed", "response.output_item.done"]
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.id == call.id)
    assert added.item.status == "in_progress" and added.item.output is None
    stored = client.responses.retrieve(final.id)
    assert [item.model_dump() for item in stored.output] == [item.model_dump() for item in final.output]


def test_responses_failing_tool_then_continuation(client, server_tools, prompt_tokens):
    first = respond(client, input="Fail please", tool_choice=function("fail"), max_output_tokens=40, temperature=0)
    [call] = [item for item in first.output if item.type == "mcp_call"]
    assert call.status == "failed" and call.output is None and "failed on purpose" in call.error
    assert first.status in ("completed", "incomplete")

    second = respond(client, input="What happened?", previous_response_id=first.id, max_output_tokens=4)
    assert not [item for item in second.output if item.type == "mcp_list_tools"]    # listed in the first turn
    asked = [{"role": "user", "content": "Fail please"}]
    seen_by_model = step_messages(asked, [_Call({"id": call.id, "status": call.status, "server_label": "tools",
                                                 "output": None, "error": call.error,
                                                 "function": {"name": "fail", "arguments": call.arguments}})])
    assert second.usage.input_tokens == prompt_tokens(
        [*seen_by_model, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What happened?"}],
        server_tools)


def test_responses_request_mcp_server_needs_an_allowed_host(client, servers, seen):
    mcp_url, _ = servers
    mine = {"type": "mcp", "server_label": "mine", "server_url": mcp_url + "/mcp", "allowed_tools": ["add"],
            "require_approval": "never", "headers": {"X-Trace": "secret-header-value"}}
    # The configured server offers `add` too: the request's is qualified with its label.
    response = respond(client, input="Add", tools=[mine], tool_choice=function("mine__add"), max_output_tokens=40)
    labels = [item.server_label for item in response.output if item.type == "mcp_list_tools"]
    assert labels == ["tools", "mine"]
    [call] = [item for item in response.output if item.type == "mcp_call"]
    arguments = json.loads(call.arguments)
    assert call.server_label == "mine" and call.output == str(arguments["a"] + arguments["b"])
    assert seen.calls == [("add", arguments)]
    assert response.tools[0].server_url == mine["server_url"] and "secret-header-value" not in response.model_dump_json()

    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]: the MCP server URL's host 'localhost:\d+' is not "
                                                     r"allowed for this tenant \(allowed_mcp_hosts: 127.0.0.1\)"):
        respond(client, input="x", tools=[{**mine, "server_url": mcp_url.replace("127.0.0.1", "localhost") + "/mcp"}])
    with pytest.raises(openai.BadRequestError, match='require_approval must be "never"'):
        respond(client, input="x", tools=[{k: v for k, v in mine.items() if k != "require_approval"}])


def test_responses_step_limit_ends_incomplete(client, seen):
    response = respond(client, input="Use the tools", tool_choice="required", max_output_tokens=300)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_tool_steps"
    calls = [item for item in response.output if item.type == "mcp_call"]
    ran = [c for c in calls if c.status != "incomplete"]
    assert len(ran) >= MAX_STEPS and len(seen.calls) == len(ran)
    assert calls[-1].status == "incomplete" and calls[-1].error == f"not run: this response reached max_tool_steps ({MAX_STEPS})"


def test_responses_client_and_server_calls_in_one_turn(client, seen, server_tools, prompt_tokens):
    """A turn that calls the client's function and a server-side tool: the server's runs, the client's
    comes back; the client's answer continues the conversation with both calls in it."""
    time_tool = {"type": "function", **CLIENT_TOOL["function"]}
    for seed in range(8):
        seen.clear()
        response = respond(client, input="Time and weather?", tools=[time_tool], tool_choice="required",
                           max_output_tokens=300, extra_body={"min_tokens": 40, "seed": seed})
        kinds = [item.type for item in response.output]
        if "function_call" in kinds and "mcp_call" in kinds[:kinds.index("function_call")]:
            break
    else:
        pytest.fail("no seed made a turn with both a server-side and a client call")
    assert response.status == "completed"
    calls = [item for item in response.output if item.type in ("mcp_call", "function_call")]
    mcp_calls = [c for c in calls if c.type == "mcp_call"]
    assert all(c.status in ("completed", "failed") for c in mcp_calls) and len(seen.calls) == len(mcp_calls)
    for call in calls:
        if call.type == "function_call":
            assert call.name == "get_time"
            jsonschema.validate(json.loads(call.arguments), CLIENT_TOOL["function"]["parameters"])

    answers = [{"type": "function_call_output", "call_id": c.call_id, "output": "12:00"}
               for c in calls if c.type == "function_call"]
    second = respond(client, input=answers, previous_response_id=response.id, tools=[time_tool], max_output_tokens=4)
    assert second.previous_response_id == response.id
    # What the model reads next: the assistant's message with every call of the turn, the server's
    # results, then the client's.
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id if c.type == "mcp_call" else c.call_id, "type": "function",
         "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
    results = [{"role": "tool", "tool_call_id": c.id, "content": c.output if c.error is None else f"Error: {c.error}"}
               for c in mcp_calls]
    results += [{"role": "tool", "tool_call_id": a["call_id"], "content": "12:00"} for a in answers]
    assert second.usage.input_tokens == prompt_tokens(
        [{"role": "user", "content": "Time and weather?"}, assistant, *results], [CLIENT_TOOL, *server_tools])
