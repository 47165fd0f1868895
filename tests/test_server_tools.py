"""Server-side tools against real servers on loopback (tests/tool_servers.py): an MCP server built
with the official `mcp` SDK over streamable HTTP, and a webhook HTTP server. No Ray: the registry
and its handlers are what the ingress uses, called directly.

Every failure must come back as a tool result with an error the model can read, never an exception."""
from __future__ import annotations

import logging
import time

import pytest

from cluster.config import ClusterConfig, ToolsSection
from deployments.protocol import APIError
from deployments.server_tools import RequestMcpServer, ToolRegistry
from tests.tool_servers import SLOW_S, TOKEN, WEATHER_PARAMETERS, Seen, dumps, mcp_app, serving, webhook_app


@pytest.fixture(scope="module")
def mcp_seen():
    return Seen()


@pytest.fixture(scope="module")
def mcp_server(mcp_seen):
    app = mcp_app(mcp_seen)
    with serving(app, "mcp") as url:
        yield url, app.server


@pytest.fixture(scope="module")
def webhook_seen():
    return Seen()


@pytest.fixture(scope="module")
def webhooks(webhook_seen):
    with serving(webhook_app(webhook_seen), "webhook") as url:
        yield url


@pytest.fixture(autouse=True)
def fresh(mcp_seen, webhook_seen):
    mcp_seen.clear()
    webhook_seen.clear()


def registry(**tools) -> ToolRegistry:
    return ToolRegistry.from_config(ClusterConfig.model_validate({"tools": tools}))


def server(url, label="tools", **more) -> dict:
    return {"server_label": label, "server_url": url + "/mcp", **more}


# -- MCP servers ------------------------------------------------------------------------------------

async def test_lists_and_calls_mcp_tools(mcp_server, mcp_seen):
    url, _ = mcp_server
    tools = await registry(mcp_servers=[server(url)]).resolve("default")
    assert {"echo", "add", "slow", "fail", "picture"} <= set(tools.tools)
    [listing] = tools.listings
    assert listing.server_label == "tools" and listing.error is None
    definition = {t["function"]["name"]: t for t in tools.definitions()}["add"]["function"]
    assert definition["description"] == "Add two integers"
    assert set(definition["parameters"]["properties"]) == {"a", "b"}

    result = await tools.call("add", dumps({"a": 2, "b": 40}))
    assert result.ok and result.output == "42" and result.outcome == "ok"
    echoed = await tools.call("echo", dumps({"text": "héllo"}))
    assert echoed.output == "echo: héllo"
    assert mcp_seen.calls == [("add", {"a": 2, "b": 40}), ("echo", {"text": "héllo"})]


async def test_allowed_tools_filter(mcp_server):
    url, _ = mcp_server
    tools = await registry(mcp_servers=[server(url, allowed_tools=["echo"])]).resolve("default")
    assert set(tools.tools) == {"echo"}
    assert [t.name for t in tools.listings[0].tools] == ["echo"]


async def test_listing_is_cached_and_refreshed_after_a_failed_call(mcp_server, mcp_seen):
    url, mcp = mcp_server
    tools = registry(mcp_servers=[server(url)])
    first = await tools.resolve("default")
    await tools.resolve("default")
    assert mcp_seen.lists == 1                                   # the second request reused the listing

    @mcp.tool(description="Added while serving")
    def late(x: int) -> str:
        return str(x)

    mcp.remove_tool("echo")
    try:
        assert "late" not in (await tools.resolve("default")).tools          # still the cached listing
        gone = await first.call("echo", dumps({"text": "hi"}))
        assert not gone.ok and gone.outcome == "error" and "echo" in gone.error
        fresh = await tools.resolve("default")                               # listed again after the failure
        assert mcp_seen.lists == 2
        assert "late" in fresh.tools and "echo" not in fresh.tools
    finally:
        mcp.remove_tool("late")
        mcp.add_tool(lambda text: f"echo: {text}", name="echo", description="Echo the text back")


async def test_mcp_timeout_is_a_tool_error(mcp_server):
    url, _ = mcp_server
    tools = await registry(mcp_servers=[server(url, timeout_s=0.5)]).resolve("default")
    started = time.monotonic()
    result = await tools.call("slow", dumps({}))
    assert time.monotonic() - started < SLOW_S - 1
    assert result.outcome == "timeout" and "did not answer within 0.5 s" in result.error
    assert result.for_model.startswith("Error: ")


async def test_mcp_tool_error_and_server_down(mcp_server):
    url, _ = mcp_server
    tools = await registry(mcp_servers=[server(url)]).resolve("default")
    result = await tools.call("fail", dumps({"reason": "disk full"}))
    assert result.outcome == "error" and "disk full" in result.error

    down = await registry(mcp_servers=[server("http://127.0.0.1:9", label="down", timeout_s=5)]).resolve("default")
    [listing] = down.listings
    assert not down.tools and listing.server_label == "down" and "failed listing its tools" in listing.error


async def test_mcp_invalid_output_and_invalid_arguments(mcp_server, mcp_seen):
    url, _ = mcp_server
    tools = await registry(mcp_servers=[server(url)]).resolve("default")
    picture = await tools.call("picture", dumps({}))
    assert picture.outcome == "invalid_output" and "image content" in picture.error

    for arguments, expected in ((dumps({"a": "two", "b": 1}), "'two' is not of type 'integer'"),
                                (dumps({"a": 1}), "'b' is a required property"),
                                ("{not json", "not JSON"), ("[1, 2]", "must be a JSON object")):
        result = await tools.call("add", arguments)
        assert result.outcome == "invalid_arguments" and expected in result.error, result
    assert [name for name, _ in mcp_seen.calls] == ["picture"]          # invalid arguments are never sent


async def test_headers_from_a_secret_env_or_file_are_sent_and_never_shown(mcp_server, tmp_path, monkeypatch, caplog):
    url, _ = mcp_server
    private = {"server_label": "private", "server_url": url + "/private/mcp"}
    monkeypatch.setenv("TEST_MCP_HEADERS", dumps({"Authorization": f"Bearer {TOKEN}"}))
    tools = await registry(mcp_servers=[{**private, "headers_from_secret": {"env": "TEST_MCP_HEADERS"}}]).resolve("x")
    assert (await tools.call("echo", dumps({"text": "in"}))).output == "echo: in"

    secret = tmp_path / "headers.json"
    secret.write_text(dumps({"Authorization": f"Bearer {TOKEN}"}))
    tools = await registry(mcp_servers=[{**private, "headers_from_secret": {"file": str(secret)}}]).resolve("x")
    assert "echo" in tools.tools

    caplog.set_level(logging.DEBUG)
    secret.write_text(dumps({"Authorization": "Bearer wrong-token-value"}))
    refused = await registry(mcp_servers=[{**private, "headers_from_secret": {"file": str(secret)}}]).resolve("x")
    assert refused.listings[0].error and "401" in refused.listings[0].error
    monkeypatch.delenv("TEST_MCP_HEADERS")
    unset = await registry(mcp_servers=[{**private, "headers_from_secret": {"env": "TEST_MCP_HEADERS"}}]).resolve("x")
    assert "$TEST_MCP_HEADERS is not set" in unset.listings[0].error
    assert "wrong-token-value" not in caplog.text and TOKEN not in caplog.text
    assert "wrong-token-value" not in refused.listings[0].error


# -- webhooks ---------------------------------------------------------------------------------------

def webhook(url, path, name="hook", **more) -> dict:
    return {"name": name, "description": "A webhook", "parameters": WEATHER_PARAMETERS, "url": url + path, **more}


async def test_webhook_posts_the_arguments_and_returns_the_body(webhooks, webhook_seen):
    tools = await registry(webhooks=[webhook(webhooks, "/weather", "get_weather")]).resolve("default")
    assert tools.definitions() == [{"type": "function", "function": {
        "name": "get_weather", "description": "A webhook", "parameters": WEATHER_PARAMETERS}}]
    result = await tools.call("get_weather", dumps({"city": "Oslo"}))
    assert result.ok and result.output == '{"city":"Oslo","temperature_c":21}'
    assert webhook_seen.calls == [("/weather", {"city": "Oslo"})]


async def test_webhook_failures_are_tool_errors(webhooks, webhook_seen, monkeypatch):
    hooks = [webhook(webhooks, "/slow", "slow", timeout_s=0.5), webhook(webhooks, "/broken", "broken"),
             webhook(webhooks, "/binary", "binary"), webhook(webhooks, "/bad-json", "bad_json"),
             webhook("http://127.0.0.1:9", "/nothing", "unreachable"),
             webhook(webhooks, "/secured", "secured", headers_from_secret={"env": "TEST_WEBHOOK_HEADERS"})]
    tools = await registry(webhooks=hooks).resolve("default")
    arguments = dumps({"city": "Oslo"})
    expected = {"slow": ("timeout", "did not answer within 0.5 s"),
                "broken": ("error", "HTTP 500: database is down"),
                "binary": ("invalid_output", "not UTF-8 text"),
                "bad_json": ("invalid_output", "says it is JSON but is not"),
                "unreachable": ("error", "cannot be reached"),
                "secured": ("error", "$TEST_WEBHOOK_HEADERS is not set")}
    for name, (outcome, message) in expected.items():
        result = await tools.call(name, arguments)
        assert (result.outcome, result.output) == (outcome, None) and message in result.error, (name, result)

    monkeypatch.setenv("TEST_WEBHOOK_HEADERS", dumps({"X-Api-Key": TOKEN}))
    assert (await tools.call("secured", dumps({"city": "x"}))).output == "hello None"


async def test_webhook_arguments_are_validated_before_sending(webhooks, webhook_seen):
    tools = await registry(webhooks=[webhook(webhooks, "/weather", "get_weather")]).resolve("default")
    for arguments, expected in ((dumps({"city": "Llanfairpwllgwyngyll"}), "is too long"),
                                (dumps({"city": "Oslo", "when": "now"}), "Additional properties"),
                                (dumps({}), "'city' is a required property")):
        result = await tools.call("get_weather", arguments)
        assert result.outcome == "invalid_arguments" and expected in result.error, result
    assert webhook_seen.calls == []


# -- per tenant, and servers a request names ---------------------------------------------------------

async def test_tenants_have_their_own_tools_and_request_servers_need_an_allowed_host(mcp_server, webhooks):
    url, _ = mcp_server
    tools = ToolRegistry(ToolsSection(), {
        "acme": ToolsSection.model_validate({"webhooks": [webhook(webhooks, "/weather", "get_weather")],
                                             "allowed_mcp_hosts": ["127.0.0.1"], "max_tool_steps": 3})})
    assert not await tools.resolve("other")
    acme = await tools.resolve("acme", [RequestMcpServer("mine", url + "/mcp", ("add",))])
    assert set(acme.tools) == {"get_weather", "add"} and acme.max_steps == 3
    assert [(listing.server_label, listing.configured) for listing in acme.listings] == [("mine", False)]
    assert (await acme.call("add", dumps({"a": 1, "b": 2}))).output == "3"

    with pytest.raises(APIError, match="host '127.0.0.1:.*' is not allowed for this tenant .*none") as refused:
        await tools.resolve("other", [RequestMcpServer("mine", url + "/mcp", where="tools[0]")])
    assert refused.value.status == 400
    with pytest.raises(APIError, match="host 'localhost:.*' is not allowed .*127.0.0.1"):
        await tools.resolve("acme", [RequestMcpServer("mine", url.replace("127.0.0.1", "localhost") + "/mcp")])
    with pytest.raises(APIError, match="server_label 'webhook' is taken"):
        await tools.resolve("acme", [RequestMcpServer("webhook", url + "/mcp")])
    with pytest.raises(APIError, match="function tool 'get_weather' has the name of a webhook"):
        await tools.resolve("acme", reserved_names={"get_weather"})


def test_config_errors_name_the_field():
    for raw, message in (
            ({"mcp_servers": [{"server_label": "a", "server_url": "ftp://x"}]}, "http:// or https:// URL"),
            ({"mcp_servers": [{"server_label": "webhook", "server_url": "http://x"}]}, "is where webhook calls"),
            ({"mcp_servers": [{"server_label": "a", "server_url": "http://x"}] * 2}, "a appear more than once"),
            ({"mcp_servers": [{"server_label": "a", "server_url": "http://x", "headers_from_secret": {}}]},
             "exactly one of env"),
            ({"webhooks": [{"name": "w", "url": "http://x", "parameters": {"type": "nope"}}]},
             "not a valid JSON schema"),
            ({"max_tool_steps": 0}, "greater than or equal to 1")):
        with pytest.raises(ValueError, match=message):
            ClusterConfig.model_validate({"tools": raw})


async def test_a_tenant_without_tools_of_its_own_gets_the_top_level_ones(webhooks):
    config = ClusterConfig.model_validate({
        "tools": {"webhooks": [webhook(webhooks, "/weather", "get_weather")]},
        "tenants": {"acme": {"tools": {"webhooks": [webhook(webhooks, "/secured", "greet")], "max_tool_steps": 1}},
                    "plain": {}}})
    tools = ToolRegistry.from_config(config)
    assert set((await tools.resolve("acme")).tools) == {"greet"}
    assert set((await tools.resolve("plain")).tools) == {"get_weather"}
    assert set((await tools.resolve("default")).tools) == {"get_weather"}
