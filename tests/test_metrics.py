"""Prometheus metrics, scraped where KubeRay's PodMonitor scrapes them: the Ray node's metrics port.

One app (tiny Qwen3-MoE, 2 expert groups over the collective transport, a KV cache small enough
that concurrent requests preempt each other, two tenants, one of them limited to a request a
minute) serves real requests through the official client; then the node's /metrics is fetched and
parsed with prometheus_client's parser, and each family must be there with the counts those
requests imply, and every series the Grafana dashboard queries must exist. Ray reports every
second in tests (tests/conftest.py), so the checks poll until the numbers arrive.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.tenants import hash_key
from tests import chat_checkpoints
from tests.serving import deployed, tiny_config

MODEL = "tiny-metrics"
ALPHA_KEY, BETA_KEY = "em-test-alpha-key", "em-test-beta-key"
DASHBOARD = Path(__file__).parent.parent / "helm" / "expertmesh" / "dashboards" / "expertmesh.json"
PREFIX = "ray_expertmesh_"
TEXT = ("Tell me about the rivers, the mountains and the old towns of the valley, what grows there in "
        "spring, and who walks the roads at night when the lamps are lit")
LONG_PROMPT = [{"role": "user", "content": TEXT}]
NO_THINKING = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
# Labels a series may carry: ours, and what Ray adds to every series (process and session).
OUR_LABELS = {"model", "tenant", "finished_reason", "route", "method", "status", "limit", "expert_group",
              "layer", "transport", "server", "tool", "outcome", "le"}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId",
              "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    config = tiny_config("metrics", chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3")),
                         model={"max_model_len": 192},
                         engine={"num_kv_blocks": 12, "max_num_seqs": 4, "max_queued_requests": 8},
                         experts={"groups": 2, "transport": "collective"},
                         tenants={"alpha": {"api_keys": [hash_key(ALPHA_KEY)]},
                                  "beta": {"api_keys": [hash_key(BETA_KEY)], "limits": {"requests_per_minute": 1}}})
    with deployed(config, serve_url) as url:
        yield config, url


@pytest.fixture(scope="module")
def traffic(app) -> dict:
    """Real requests of tenant alpha: two equal ones in a row (the second finds the prompt in the
    prefix cache), four different ones at once (more than the 12-block KV cache holds:
    preemptions), one stream the client leaves after its first chunk, one unknown model, one model
    listing. Tenant beta: one request, then one over its limit of one a minute. One unknown key."""
    base = app[1] + "/v1"
    client = openai.OpenAI(base_url=base, api_key=ALPHA_KEY, max_retries=0, timeout=180)
    usage = []
    for _ in range(2):
        response = client.chat.completions.create(model=MODEL, messages=LONG_PROMPT, max_tokens=8,
                                                  temperature=0, extra_body=NO_THINKING)
        usage.append(response.usage)

    async def concurrent():
        async_client = openai.AsyncOpenAI(base_url=base, api_key=ALPHA_KEY, max_retries=0, timeout=180)
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

    beta = openai.OpenAI(base_url=base, api_key=BETA_KEY, max_retries=0, timeout=180)
    beta_usage = beta.chat.completions.create(model=MODEL, messages=LONG_PROMPT, max_tokens=4,
                                              extra_body=NO_THINKING).usage
    with pytest.raises(openai.RateLimitError):
        beta.chat.completions.create(model=MODEL, messages=LONG_PROMPT, max_tokens=4, extra_body=NO_THINKING)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="em-no-such-key", max_retries=0).models.list()
    return {"finished": len(usage), "prompt_tokens": sum(u.prompt_tokens for u in usage),
            "abort_prompt_tokens": usage[0].prompt_tokens, "completion_tokens": 8 * 2 + 40 * 4,
            "beta_prompt_tokens": beta_usage.prompt_tokens}


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

def test_request_families_count_each_tenants_requests(traffic, metrics_url):
    finished = traffic["finished"]
    started = finished + 1                                   # + the stream the client left

    def ready(f):
        return (total(f, "request_success", "_total", tenant="alpha", finished_reason="length") == finished
                and total(f, "request_success", "_total", tenant="alpha", finished_reason="abort") == 1
                and total(f, "request_success", "_total", tenant="beta") == 1
                and total(f, "e2e_request_latency_seconds", "_count", tenant="alpha") == finished)

    f = poll(metrics_url, ready)
    assert total(f, "request_success", "_total", tenant="alpha", finished_reason="length") == finished
    assert total(f, "request_success", "_total", tenant="alpha", finished_reason="abort") == 1
    assert total(f, "request_success", "_total", tenant="beta", finished_reason="length") == 1
    assert {s.labels["tenant"] for s in samples(f, "request_success", "_total")} == {"alpha", "beta"}
    alpha = {"tenant": "alpha"}
    assert total(f, "time_to_first_token_seconds", "_count", **alpha) == started
    assert total(f, "request_queue_time_seconds", "_count", **alpha) == started
    assert total(f, "e2e_request_latency_seconds", "_count", **alpha) == finished
    assert total(f, "e2e_request_latency_seconds", "_sum", **alpha) >= total(f, "time_to_first_token_seconds", "_sum", **alpha) > 0
    assert total(f, "prompt_tokens", "_total", **alpha) == traffic["prompt_tokens"] + traffic["abort_prompt_tokens"]
    assert total(f, "prompt_tokens", "_total", tenant="beta") == traffic["beta_prompt_tokens"]
    assert total(f, "generation_tokens", "_total", tenant="beta") == 4
    generated = total(f, "generation_tokens", "_total", **alpha)
    assert generated >= traffic["completion_tokens"] + 1
    # Every token is a first one or follows one: the two histograms count them all.
    assert generated == (total(f, "time_to_first_token_seconds", "_count", **alpha)
                         + total(f, "inter_token_latency_seconds", "_count", **alpha))
    # vLLM's buckets, ending in +Inf, cumulative.
    ttft = samples(f, "time_to_first_token_seconds", "_bucket", **alpha)
    assert [s.labels["le"] for s in ttft][:3] == ["0.001", "0.005", "0.01"] and ttft[-1].labels["le"] == "+Inf"
    assert ttft[-1].value == started


# -- router replicas: the engine's state ---------------------------------------------------------------------

def test_engine_families_show_queue_cache_and_preemptions(traffic, metrics_url):
    def ready(f):
        return (samples(f, "num_requests_running", tenant="beta") and total(f, "num_requests_running") == 0
                and total(f, "num_requests_waiting") == 0 and total(f, "num_preemptions", "_total") >= 1)

    f = poll(metrics_url, ready)
    assert total(f, "num_requests_running") == 0 and total(f, "num_requests_waiting") == 0   # all done
    assert {s.labels["tenant"] for s in samples(f, "num_requests_waiting")} == {"alpha", "beta"}
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

def test_ingress_counts_http_requests_and_rate_limit_rejections(traffic, metrics_url):
    chat = "/v1/chat/completions"

    def ready(f):
        return (total(f, "http_requests", "_total", route=chat, tenant="alpha", status="200") == traffic["finished"] + 1
                and total(f, "http_requests", "_total", tenant="-", status="401") == 1
                and total(f, "rate_limit_rejections", "_total") == 1)

    f = poll(metrics_url, ready)
    requests = lambda **labels: total(f, "http_requests", "_total", **labels)  # noqa: E731
    assert requests(route=chat, tenant="alpha", status="200", method="POST") == traffic["finished"] + 1
    assert requests(route=chat, tenant="alpha", status="404") == 1
    assert requests(route="/v1/models", tenant="alpha", status="200", method="GET") == 1
    assert requests(route=chat, tenant="beta", status="200") == 1 and requests(route=chat, tenant="beta", status="429") == 1
    assert requests(route="/v1/models", tenant="-", status="401") == 1     # the unknown key
    assert total(f, "rate_limit_rejections", "_total", tenant="beta", limit="requests_per_minute") == 1
    assert total(f, "rate_limit_rejections", "_total") == 1
    ingress = {s.labels["WorkerId"] for s in samples(f, "http_requests", "_total")}
    router = {s.labels["WorkerId"] for s in samples(f, "request_success", "_total")}
    assert ingress and router and not ingress & router


# -- the dashboard, and cardinality ------------------------------------------------------------------------------

def test_every_series_the_dashboard_queries_is_exported(traffic, metrics_url):
    f = poll(metrics_url, lambda f: samples(f, "rate_limit_rejections", "_total"))
    targets = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    queried = {name for expr in targets for name in re.findall(r"\bray_expertmesh_\w+", expr)}
    assert len(queried) >= 18
    for name in queried:
        family = re.sub(r"_(bucket|total)$", "", name).removeprefix(PREFIX)
        suffix = name.removeprefix(PREFIX + family)
        assert samples(f, family, suffix), f"the dashboard queries {name}, which is not exported"
    for expr in targets:       # grouped by labels the series have (pod: the PodMonitor adds it)
        labels = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        for name in re.findall(r"\bray_expertmesh_\w+", expr):
            have = {k for s in f[re.sub(r"_(bucket|total)$", "", name)].samples for k in s.labels}
            assert labels - {"pod"} <= have, (expr, labels - have)


def test_labels_are_bounded(traffic, metrics_url):
    f = poll(metrics_url, lambda f: samples(f, "http_requests", "_total"))
    for family in f.values():                  # every app's series in this session, not only ours
        for sample in family.samples:
            assert set(sample.labels) <= OUR_LABELS | RAY_LABELS, (sample.name, sample.labels)
        for sample in (s for s in family.samples if s.labels.get("model") == MODEL):
            assert not any(v.startswith(("chatcmpl-", "cmpl-", "resp_", "em-")) for v in sample.labels.values())
    routes = {s.labels["route"] for s in samples(f, "http_requests", "_total")}
    assert routes <= {"/v1/chat/completions", "/v1/models", "/v1/models/{model_id:path}", "/health", "/ready"}, routes
    assert {s.labels["tenant"] for s in samples(f, "http_requests", "_total")} == {"alpha", "beta", "-"}
