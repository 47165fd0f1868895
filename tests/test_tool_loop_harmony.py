"""The server-side tool loop in gpt-oss's harmony format: a call from the commentary channel runs on
the MCP server, and the next step's prompt holds the call and its result as harmony renders a
client's tool round trip. A tiny random gpt-oss; the named tool choice forces the call."""
from __future__ import annotations

import asyncio
import json

import openai
import pytest

from cluster.config import ToolsSection
from deployments.chat import ChatFormat
from deployments.protocol import ChatCompletionRequest
from deployments.server_tools import ToolRegistry
from models.tokenizer import Tokenizer
from tests import chat_checkpoints
from tests.serving import deployed, tiny_config
from tests.tool_servers import Seen, mcp_app, serving

MODEL = "tiny-oss-tools"
BUDGET = {"thinking_token_budget": 5}


@pytest.fixture(scope="module")
def seen():
    return Seen()


@pytest.fixture(scope="module")
def mcp_url(seen):
    with serving(mcp_app(seen), "mcp") as url:
        yield url


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoints.gpt_oss(tmp_path_factory.mktemp("gpt-oss-tools"))


@pytest.fixture(scope="module")
def tools(mcp_url) -> dict:
    return {"mcp_servers": [{"server_label": "tools", "server_url": mcp_url + "/mcp", "allowed_tools": ["echo"]}]}


@pytest.fixture(scope="module")
def client(serve_url, checkpoint, tools):
    config = tiny_config("oss-tools", checkpoint, tools=tools, model={"max_model_len": 1024})
    with deployed(config, serve_url) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)


def test_harmony_call_runs_and_its_result_is_rendered_for_the_next_step(client, checkpoint, tools, seen):
    messages = [{"role": "user", "content": "Echo something"}]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, tool_choice={"type": "function", "function": {"name": "echo"}},
        max_tokens=80, stream=True, stream_options={"include_usage": True}, extra_body=BUDGET))
    reasoning, calls = [], []
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        calls += (delta.model_extra or {}).get("server_tool_calls", [])
        if not calls and getattr(delta, "reasoning_content", None):
            reasoning.append(delta.reasoning_content)         # the first step's analysis
    started, done = calls
    assert started["function"]["name"] == "echo" and done["status"] == "completed"
    text = json.loads(started["function"]["arguments"])["text"]
    assert done["output"] == f"echo: {text}" and seen.calls == [("echo", {"text": text})]

    chat = ChatFormat(Tokenizer.from_pretrained(checkpoint, "gpt_oss"), "gpt_oss")
    offered = asyncio.run(ToolRegistry(ToolsSection.model_validate(tools)).resolve("default")).definitions()
    request = ChatCompletionRequest(model=MODEL, messages=messages, tools=offered)
    second = [*messages, {"role": "assistant", "content": None, "reasoning_content": "".join(reasoning),
                          "tool_calls": [{"id": started["id"], "type": "function", "function": started["function"]}]},
              {"role": "tool", "tool_call_id": started["id"], "content": done["output"]}]
    expected = len(chat.render(request).token_ids) + len(chat.render(request, second).token_ids)
    assert chunks[-1].usage.prompt_tokens == expected

