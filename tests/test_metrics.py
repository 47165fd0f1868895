"""Prometheus metrics, scraped where KubeRay's PodMonitor scrapes them: the Ray node's metrics port.

One app (tiny Qwen3-MoE, 2 expert groups over the collective transport, a KV cache small enough
that concurrent requests preempt each other) serves real requests through the official client;
then the node's /metrics is fetched and parsed with prometheus_client's parser, and each family
must be there with the counts those requests imply. Ray reports every second in tests
(tests/conftest.py), so the checks poll until the numbers arrive.
"""
from __future__ import annotations

import asyncio
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import chat_checkpoints
from tests.serving import deployed, tiny_config

MODEL = "tiny-metrics"
PREFIX = "ray_expertmesh_"
TEXT = ("Tell me about the rivers, the mountains and the old towns of the valley, what grows there in "
        "spring, and who walks the roads at night when the lamps are lit")
LONG_PROMPT = [{"role": "user", "content": TEXT}]
NO_THINKING = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
# Labels a series may carry: ours, and what Ray adds to every series (process and session).
OUR_LABELS = {"model", "tenant", "finished_reason", "route", "method", "status", "limit", "expert_group",
              "layer", "transport", "le"}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId",
              "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    config = tiny_config("metrics", chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3")),
                         model={"max_model_len": 192},
                         engine={"num_kv_blocks": 12, "max_num_seqs": 4, "max_queued_requests": 8},
                         experts={"groups": 2, "transport": "collective"})
    with deployed(config, serve_url) as url:
        yield config, url


@pytest.fixture(scope="module")
def traffic(app) -> dict:
    """Real requests: two equal ones in a row (the second finds the prompt in the prefix cache),
    four different ones at once (more than the 12-block KV cache holds: preemptions), one stream
    the client leaves after its first chunk, one unknown model, one model listing."""
    base = app[1] + "/v1"
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=180)
    usage = []
    for _ in range(2):
        response = client.chat.completions.create(model=MODEL, messages=LONG_PROMPT, max_tokens=8,
                                                  temperature=0, extra_body=NO_THINKING)
        usage.append(response.usage)

    async def concurrent():
        async_client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=180)
        responses = await asyncio.gather(*[
            async_client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"{i}: {TEXT}"}], max_tokens=40,
                temperature=0.8, seed=i, extra_body=NO_THINKING) for i in range(4)])
        return [r.usage for r in responses]

    usage += asyncio.run(concurrent())
    stream = client.chat.completions.create(model=MODEL, messages=LONG_PROMPT, max_tokens=120, stream=True,
                                            extra_body=NO_THINKING)
    next(iter(stream))
    stream.close()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=LONG_PROMPT, max_tokens=4)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert [u.completion_tokens for u in usage] == [8, 8, 40, 40, 40, 40]
    return {"finished": len(usage), "prompt_tokens": sum(u.prompt_tokens for u in usage),
            "abort_prompt_tokens": usage[0].prompt_tokens, "completion_tokens": 8 * 2 + 40 * 4}


# -- scraping -----------------------------------------------------------------------------------------

def scrape(url: str) -> dict:
    """Family name -> family, for our families only."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith(PREFIX)}


def samples(families: dict, family: str, suffix: str = "", **labels) -> list:
    """The samples named family+suffix of our model with these labels (across processes)."""
    found = families.get(PREFIX + family)
    if found is None:
        return []
    want = {"model": MODEL, **labels}
    return [s for s in found.samples if s.name == PREFIX + family + suffix
            and all(s.labels.get(k) == v for k, v in want.items())]


def total(families: dict, family: str, suffix: str = "", **labels) -> float:
    return sum(s.value for s in samples(families, family, suffix, **labels))


def poll(url: str, ready, timeout: float = 120.0) -> dict:
    """Scrape until `ready(families)` holds (Ray reports every second here); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(url)
        if ready(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.5)


# -- router replicas: vLLM's per-request families ---------------------------------------------------------

def test_request_families_count_the_requests_made(traffic, metrics_url):
    finished = traffic["finished"]
    started = finished + 1                                   # + the stream the client left

    def ready(f):
        return (total(f, "request_success", "_total", finished_reason="length") == finished
                and total(f, "request_success", "_total", finished_reason="abort") == 1
                and total(f, "e2e_request_latency_seconds", "_count") == finished)

    f = poll(metrics_url, ready)
    assert total(f, "request_success", "_total", finished_reason="length") == finished
    assert total(f, "request_success", "_total", finished_reason="abort") == 1
    assert {s.labels["finished_reason"] for s in samples(f, "request_success", "_total")} == {"length", "abort"}
    assert total(f, "time_to_first_token_seconds", "_count") == started
    assert total(f, "request_queue_time_seconds", "_count") == started
    assert total(f, "e2e_request_latency_seconds", "_count") == finished
    assert total(f, "e2e_request_latency_seconds", "_sum") >= total(f, "time_to_first_token_seconds", "_sum") > 0
    assert total(f, "prompt_tokens", "_total") == traffic["prompt_tokens"] + traffic["abort_prompt_tokens"]
    generated = total(f, "generation_tokens", "_total")
    assert generated >= traffic["completion_tokens"] + 1
    # Every token is a first one or follows one: the two histograms count them all.
    assert generated == total(f, "time_to_first_token_seconds", "_count") + total(f, "inter_token_latency_seconds", "_count")
    # vLLM's buckets, ending in +Inf, cumulative.
    ttft = samples(f, "time_to_first_token_seconds", "_bucket")
    assert [s.labels["le"] for s in ttft][:3] == ["0.001", "0.005", "0.01"] and ttft[-1].labels["le"] == "+Inf"
    assert ttft[-1].value == started
    assert all(s.labels["tenant"] == "default" for s in ttft)


# -- router replicas: the engine's state ---------------------------------------------------------------------

def test_engine_families_show_queue_cache_and_preemptions(traffic, metrics_url):
    def ready(f):
        return (samples(f, "num_requests_running") and total(f, "num_requests_running") == 0
                and total(f, "num_requests_waiting") == 0 and total(f, "num_preemptions", "_total") >= 1)

    f = poll(metrics_url, ready)
    assert total(f, "num_requests_running") == 0 and total(f, "num_requests_waiting") == 0   # all done
    assert samples(f, "num_requests_waiting", tenant="default")
    assert 0 <= total(f, "kv_cache_usage_perc") <= 1
    # Four requests of ~6 blocks each in a 12-block cache: somebody had to give blocks back.
    assert total(f, "num_preemptions", "_total") >= 1
    queries, hits = total(f, "prefix_cache_queries", "_total"), total(f, "prefix_cache_hits", "_total")
    assert queries >= traffic["prompt_tokens"]          # preempted requests look their prompt up again
    assert 16 <= hits < queries                         # the repeated prompt found at least a block
    assert total(f, "request_queue_time_seconds", "_sum") > 0    # some of the four waited


# -- expert groups, from the router's side and their own ------------------------------------------------------

def test_expert_groups_report_what_the_router_sent_them(traffic, metrics_url):
    def ready(f):
        routed = [total(f, "expert_group_tokens", "_total", expert_group=g) for g in "01"]
        served = [total(f, "expert_group_served_tokens", "_total", expert_group=g) for g in "01"]
        return all(routed) and routed == served

    f = poll(metrics_url, ready)
    routed = [total(f, "expert_group_tokens", "_total", expert_group=g) for g in "01"]
    assert all(routed) and routed == [total(f, "expert_group_served_tokens", "_total", expert_group=g)
                                      for g in "01"]
    assert [total(f, "expert_group_restarts", "_total", expert_group=g) for g in "01"] == [0, 0]
    assert samples(f, "expert_group_restarts", "_total", expert_group="1")       # exported at 0
    imbalance = samples(f, "expert_load_imbalance")
    assert imbalance and all(1 <= s.value <= 2 for s in imbalance)            # 2 groups: max/mean in [1, 2]
    assert total(f, "dispatch_latency_seconds", "_count", transport="collective") > 0
    assert all(total(f, "expert_group_step_seconds", "_count", expert_group=g) > 0 for g in "01")
    # Three kinds of process reported: router replica, both expert groups, ingress (below).
    router = {s.labels["WorkerId"] for s in samples(f, "expert_group_tokens", "_total")}
    groups = {s.labels["WorkerId"] for s in samples(f, "expert_group_served_tokens", "_total")}
    assert len(router) == 1 and len(groups) == 2 and not router & groups


# -- ingress replicas ---------------------------------------------------------------------------------------------

def test_ingress_counts_http_requests_by_route_and_status(traffic, metrics_url):
    chat = "/v1/chat/completions"

    def ready(f):
        return (total(f, "http_requests", "_total", route=chat, status="200") == traffic["finished"] + 1
                and total(f, "http_requests", "_total", route=chat, status="404") == 1)

    f = poll(metrics_url, ready)
    assert total(f, "http_requests", "_total", route=chat, status="200", method="POST") == traffic["finished"] + 1
    assert total(f, "http_requests", "_total", route=chat, status="404") == 1
    assert total(f, "http_requests", "_total", route="/v1/models", status="200", method="GET") >= 1
    ingress = {s.labels["WorkerId"] for s in samples(f, "http_requests", "_total")}
    router = {s.labels["WorkerId"] for s in samples(f, "request_success", "_total")}
    assert ingress and router and not ingress & router


# -- cardinality ----------------------------------------------------------------------------------------------------

def test_labels_are_bounded(traffic, metrics_url):
    f = poll(metrics_url, lambda f: samples(f, "http_requests", "_total"))
    for family in f.values():
        for sample in family.samples:
            assert set(sample.labels) <= OUR_LABELS | RAY_LABELS, (sample.name, sample.labels)
            assert not any(v.startswith(("chatcmpl-", "cmpl-", "resp_", "sk-")) for v in sample.labels.values())
    routes = {s.labels["route"] for s in samples(f, "http_requests", "_total")}
    assert routes <= {"/v1/chat/completions", "/v1/models", "/v1/models/{model_id:path}", "/health", "/ready"}, routes
