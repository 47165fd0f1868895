"""Session affinity (deployments/affinity.py): a conversation's turns go to the router replica that
holds its prefix, so its prefix-cache hits stay high with several replicas.

The serving tests run a real Serve app with 2 router replicas of a tiny Qwen3-MoE checkpoint and talk
to it with the official openai client. Each replica's prefix-cache counters (Router.stats) say
where every turn ran: a replica's prompt tokens are exactly those of the conversations whose home it
is. Random weights write junk, so nothing here depends on the words."""
from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys

import openai
import pytest

from deployments import app as app_module
from deployments.affinity import SessionAffinityRouter, home_of, weight
from tests import chat_checkpoints
from tests.serving import deployed, tiny_config

MODEL = "tiny-affinity"
BLOCK = 16                          # engine.block_size of tiny_config
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
WORDS = ("river stone lantern orchard copper violet harbor meadow thunder cedar falcon marble "
         "ember glacier willow saffron canyon beacon quartz prairie").split()


# -- the choice of a home, without Ray ----------------------------------------------------------------

def test_homes_spread_and_a_new_replica_takes_only_its_share():
    sessions = [f"conversation-{i}" for i in range(3000)]
    two = {s: home_of(s, ["replica-a", "replica-b"]) for s in sessions}
    assert 1300 < sum(h == "replica-a" for h in two.values()) < 1700
    three = {s: home_of(s, ["replica-a", "replica-b", "replica-c"]) for s in sessions}
    moved = [s for s in sessions if three[s] != two[s]]
    assert all(three[s] == "replica-c" for s in moved)          # none moves between a and b
    assert 800 < len(moved) < 1200                                # about a third moves to c
    assert {s: home_of(s, ["replica-b", "replica-a"]) for s in sessions} == two   # order is irrelevant


def test_homes_agree_across_processes():
    """Every ingress replica must pick the same home: no per-process salted hash."""
    code = "from deployments.affinity import weight; print(weight('conversation-7', 'replica-a'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert int(out.stdout) == weight("conversation-7", "replica-a")


def router_deployment(args: dict):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    application = call_user_app_builder_with_args_if_necessary(app_module.build_app, args)
    return application._bound_deployment.init_args[0]._bound_deployment


def test_config_switch():
    on = router_deployment({"engine": {"max_num_seqs": 24}, "router": {"num_replicas": 2}})
    config = on._deployment_config.request_router_config
    assert config.get_request_router_class().__name__ == SessionAffinityRouter.__name__
    assert config.request_router_kwargs == {"spill_at": 24}
    off = router_deployment({"router": {"num_replicas": 2, "session_affinity": False}})
    assert off._deployment_config.request_router_config.is_default_request_router()


# -- a real app with 2 router replicas ---------------------------------------------------------------

@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    config = tiny_config("affinity", chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3-affinity")),
                         model={"id": MODEL, "max_model_len": 1024},
                         engine={"max_num_seqs": 16, "max_queued_requests": 16, "num_kv_blocks": 2048},
                         router={"num_replicas": 2})
    with deployed(config, serve_url) as url:
        yield config, url


def async_client(app) -> openai.AsyncOpenAI:
    """One per test: an async client belongs to the event loop of the test that uses it."""
    return openai.AsyncOpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=180)


async def replica_stats(config) -> dict[str, dict]:
    """Router.stats of each of the 2 replicas, by replica id. An unkeyed call goes to the less
    loaded of the two (power of two choices), so this asks until both have answered."""
    from ray import serve

    handle = serve.get_deployment_handle("Router", app_name=config.name)
    stats: dict[str, dict] = {}
    for _ in range(300):
        one = await handle.stats.remote()
        stats[one["replica"]] = one
        if len(stats) == 2:
            return stats
        await asyncio.sleep(0.1)
    raise AssertionError(f"only replicas {sorted(stats)} answered Router.stats")


def growth(before: dict[str, dict], after: dict[str, dict], key: str) -> dict[str, int]:
    return {replica: after[replica][key] - before[replica][key] for replica in before}


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


async def converse(client: openai.AsyncOpenAI, key: str, seed: int, turns: int) -> list:
    """One conversation, turn after turn; returns each turn's usage."""
    messages = [{"role": "user", "content": f"{key}: {words(seed, 120)}"}]
    usages = []
    for turn in range(turns):
        response = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, prompt_cache_key=key,
            extra_body={"ignore_eos": True, **NO_THINKING})
        usages.append(response.usage)
        messages += [{"role": "assistant", "content": response.choices[0].message.content or ""},
                     {"role": "user", "content": f"Turn {turn}: {words(seed * 100 + turn, 8)}"}]
    return usages


async def test_every_turn_runs_where_its_conversation_started(app):
    config, client = app[0], async_client(app)
    before = await replica_stats(config)
    replicas = sorted(before)
    # Six conversations for each replica, so both serve some whatever ids Serve gave them.
    keys: dict[str, list[str]] = {replica: [] for replica in replicas}
    for i in range(1000):
        key = f"conversation-{i}"
        home = keys[home_of(key, replicas)]
        if len(home) < 6:
            home.append(key)
        if all(len(k) == 6 for k in keys.values()):
            break
    conversations = [(home, key) for home in replicas for key in keys[home]]

    usages = await asyncio.gather(*(converse(client, key, seed, turns=3)
                                    for seed, (_, key) in enumerate(conversations)))
    after = await replica_stats(config)

    # What a user sees: each continued turn finds the previous turn's whole prompt cached, all but
    # the last block (the template's assistant header differs once the reply is in the history).
    for (_, key), turns in zip(conversations, usages):
        for previous, turn in zip(turns, turns[1:]):
            assert turn.prompt_tokens_details.cached_tokens >= previous.prompt_tokens - 2 * BLOCK, key
    continued = [turn for turns in usages for turn in turns[1:]]
    hit_rate = sum(t.prompt_tokens_details.cached_tokens for t in continued) / sum(t.prompt_tokens for t in continued)
    assert hit_rate > 0.6           # the rest: the new reply and question, the unmatched last block

    # Where they ran: each replica looked up exactly its own conversations' prompts, and found
    # exactly the cached tokens the responses reported.
    queries, hits = growth(before, after, "prefix_cache_queries"), growth(before, after, "prefix_cache_hits")
    for replica in replicas:
        mine = [turn for (home, _), turns in zip(conversations, usages) if home == replica for turn in turns]
        assert queries[replica] == sum(t.prompt_tokens for t in mine)
        assert hits[replica] == sum(t.prompt_tokens_details.cached_tokens for t in mine)


async def test_a_busy_home_spills_to_the_other_replica(app):
    """Once a conversation's home runs a full batch (max_num_seqs requests), its next requests go
    to the other replica instead of waiting in the home's queue."""
    config, client = app[0], async_client(app)
    before = await replica_stats(config)
    key = "one-busy-conversation"
    home = home_of(key, before)
    other = next(replica for replica in before if replica != home)

    def ask(i: int, max_tokens: int, stream: bool = False):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"{key} {i}: {words(i, 20)}"}],
            max_tokens=max_tokens, prompt_cache_key=key, stream=stream,
            extra_body={"ignore_eos": True, **NO_THINKING})

    # A full batch at home: fewer than max_num_seqs were in flight when each was routed, so all
    # went home; a stream's first chunk comes once its request runs.
    streams = await asyncio.gather(*(ask(i, 900, stream=True) for i in range(config.engine.max_num_seqs)))
    try:
        for stream in streams:
            await stream.__anext__()
        extra = [await ask(100 + i, 4) for i in range(4)]
    finally:
        for stream in streams:
            await stream.close()
    assert all(r.choices[0].finish_reason == "length" for r in extra)
    spilled = growth(before, await replica_stats(config), "prefix_cache_queries")[other]
    assert 0 < spilled <= sum(r.usage.prompt_tokens for r in extra)      # only the extras ran there


def test_completions_take_prompt_cache_key_and_reject_an_empty_one(app):
    client = openai.OpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=180)
    prompt = list(range(1000, 1000 + 5 * BLOCK + 3))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                      extra_body={"prompt_cache_key": "document-1"})
    second = client.completions.create(model=MODEL, prompt=prompt + [7, 8, 9], max_tokens=4,
                                       extra_body={"prompt_cache_key": "document-1"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 5 * BLOCK
    with pytest.raises(openai.BadRequestError, match="prompt_cache_key"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       prompt_cache_key="")


@pytest.mark.parametrize("key", [None, "conversation-n"])
def test_the_n_choices_of_one_request_are_all_routed(app, key):
    """The `n` router calls of one ingress request share Serve's internal request id; each must
    still get its replica (it used to wait for ever past the first)."""
    client = openai.OpenAI(base_url=app[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, n=3, temperature=1.0,
                                         seed=1, extra_body={"ignore_eos": True, "prompt_cache_key": key})
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert response.usage.completion_tokens == 9
