"""Tenants on a real Serve app with two ingress replicas, through the official openai client: API
keys (from the config and from a mounted key directory), 401s, open health checks, each limit's
429 with Retry-After counted across both replicas, the per-tenant context, and fair share.

Random weights write junk, so the tests check what does not depend on the words: statuses, error
codes, headers, token counts and the order requests finish in."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from deployments.tenants import LIMITS_NAMESPACE, hash_key
from tests import chat_checkpoints
from tests.serving import deployed, router_stats, tiny_config

NAME = "tenants"
MODEL = f"tiny-{NAME}"
KEYS = {name: f"sk-{name}-test-0123456789" for name in ("alpha", "beta", "rpm", "tpm", "streams", "ctx",
                                                         "flood", "late")}
HELLO = [{"role": "user", "content": "Hello!"}]
TPM = 200
LIMITS = {"rpm": {"requests_per_minute": 3}, "tpm": {"tokens_per_minute": TPM},
          "streams": {"max_concurrent_streams": 2}, "ctx": {"max_context_tokens": 64}}


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    # beta's key comes the way the Helm chart mounts it: a file named after the tenant.
    keys_dir = tmp_path_factory.mktemp("api-keys")
    (keys_dir / "beta").write_text(KEYS["beta"] + "\n")
    tenants = {name: {"api_keys": [hash_key(key)], "limits": LIMITS.get(name, {})}
               for name, key in KEYS.items() if name != "beta"}
    config = tiny_config(
        NAME, chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3")), tenants=tenants,
        ingress={"num_replicas": 2, "ray_actor_options": {
            "num_cpus": 0.1, "runtime_env": {"env_vars": {"EXPERTMESH_API_KEYS_DIR": str(keys_dir)}}}},
        engine={"max_queued_requests": 64})
    try:
        with deployed(config, serve_url) as url:
            yield config, url
    finally:
        import ray

        try:                # the limits' actor is detached: it outlives the app unless killed
            ray.kill(ray.get_actor(f"expertmesh-limits-{NAME}", namespace=LIMITS_NAMESPACE))
        except ValueError:
            pass


def client(app, tenant: str | None = None, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=app[1] + "/v1", api_key=key or KEYS[tenant], max_retries=0, timeout=300)


def async_client(app, tenant: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=app[1] + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=300)


def chat(c, max_tokens: int, **kwargs):
    return c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True}, **kwargs)


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def retry_after(error: openai.APIStatusError) -> int:
    return int(error.response.headers["retry-after"])


# -- keys --------------------------------------------------------------------------------------------

def test_no_key_or_a_wrong_key_is_401_and_health_stays_open(app):
    status, body = get(app[1] + "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(client(app, key="sk-not-a-key"), 1)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert "sk-not-a-key" not in str(caught.value)
    assert get(app[1] + "/health")[0] == 200
    status, body = get(app[1] + "/ready")
    assert status == 200 and body["status"] == "ready"


def test_keys_from_the_config_and_from_the_key_directory_work(app):
    for tenant in ("alpha", "beta"):
        response = chat(client(app, tenant), 3)
        assert response.usage.completion_tokens == 3
        assert [m.id for m in client(app, tenant).models.list().data] == [MODEL]


# -- limits, across both ingress replicas --------------------------------------------------------------

def test_requests_per_minute_counts_the_requests_of_both_replicas(app):
    async def burst():
        c = async_client(app, "rpm")
        return await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
                                      for _ in range(8)), return_exceptions=True)

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 5 and len([r for r in results if not isinstance(r, Exception)]) == 3, results
    for error in refused:
        assert "requests_per_minute" in error.message and error.code == "rate_limit_exceeded"
        assert 1 <= retry_after(error) <= 60


def test_tokens_per_minute_admits_against_prompt_plus_max_tokens(app):
    c = client(app, "tpm")
    first = chat(c, 20)
    used = first.usage.total_tokens                     # the prompt plus the 20 tokens it made
    prompt = first.usage.prompt_tokens
    room = TPM - used - prompt                           # max_tokens that exactly fills the minute
    with pytest.raises(openai.RateLimitError) as caught:
        chat(c, room + 1)
    assert "tokens_per_minute" in caught.value.message and 1 <= retry_after(caught.value) <= 60
    assert chat(c, room).usage.total_tokens == TPM - used
    with pytest.raises(openai.RateLimitError):
        chat(c, 1)


def test_concurrent_streams_are_limited_and_given_back(app):
    c = client(app, "streams")
    streams = [chat(c, 400, stream=True) for _ in range(2)]
    try:
        for stream in streams:
            next(iter(stream))                           # both are running
        for _ in range(3):                               # whichever replica these reach
            with pytest.raises(openai.RateLimitError) as caught:
                chat(c, 1)
            assert "max_concurrent_streams" in caught.value.message and retry_after(caught.value) >= 1
    finally:
        for stream in streams:
            stream.close()                               # the client leaves: its streams end
    deadline = time.monotonic() + 60
    while True:
        try:
            assert chat(c, 1).usage.completion_tokens == 1
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "closed streams were not given back"
            time.sleep(0.5)


def test_max_context_tokens_is_the_tenants_context(app):
    c = client(app, "ctx")
    with pytest.raises(openai.BadRequestError) as caught:
        chat(c, 100)
    assert caught.value.code == "context_length_exceeded" and "max_context_tokens" in caught.value.message
    assert "64 tokens" in caught.value.message
    # Without max_tokens the completion gets what the tenant's context leaves, not the model's 512.
    response = c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.total_tokens == 64
    assert chat(client(app, "alpha"), 100).usage.completion_tokens == 100     # others keep the model's


# -- fair share ------------------------------------------------------------------------------------

def test_a_tenant_flooding_the_queue_does_not_starve_one_that_comes_after(app):
    """flood sends 50 requests; once all of them are in the router, late sends 5. late's finish
    long before flood's last ones; first come, first served would finish them after all of flood's."""
    finished: list[str] = []

    async def one(c, tenant: str) -> None:
        await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
        finished.append(tenant)

    async def scenario() -> int:
        flood_client, late_client = async_client(app, "flood"), async_client(app, "late")
        flood = [asyncio.create_task(one(flood_client, "flood")) for _ in range(50)]
        deadline = time.monotonic() + 120
        while (await asyncio.to_thread(router_stats, app[0]))["engine_requests"] + len(finished) < 50:
            assert time.monotonic() < deadline, "flood's requests did not reach the router"
            await asyncio.sleep(0.1)
        waiting = 50 - len(finished)
        late = [asyncio.create_task(one(late_client, "late")) for _ in range(5)]
        await asyncio.gather(*flood, *late)
        return waiting

    flood_waiting = asyncio.run(scenario())
    last_late = max(i for i, tenant in enumerate(finished) if tenant == "late")
    flood_after = finished[last_late + 1:].count("flood")
    assert flood_waiting >= 25, f"only {flood_waiting} of flood's requests were left: the test proves little"
    assert flood_after >= flood_waiting - 20, (flood_waiting, finished)
