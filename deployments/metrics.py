"""Prometheus metrics of an expertmesh cluster, recorded with Ray's metrics API.

Every process records with `ray.util.metrics`; Ray's metrics agent on each node serves what the
node's processes recorded on the node's metrics export port (`ray start --metrics-export-port`,
the container port the Helm chart names `metrics` and KubeRay's PodMonitor scrapes). Ray prefixes
every name with `ray_`: `expertmesh_time_to_first_token_seconds` is scraped as
`ray_expertmesh_time_to_first_token_seconds`, each series with Ray's own labels (WorkerId,
NodeAddress, ...) besides ours.

    ingress replicas  `HTTPMetrics`: HTTP requests by route and status; `IngressMetrics` also holds
                      the rate-limit rejections the tenant limits count, and the server-side tool
                      calls (by server, tool and outcome) and their latency
    router replicas   `RequestMetrics` in `Router.generate`: time to first token, inter-token
                      latency, end-to-end latency, queue time, tokens, finish reason; `EngineMetrics`,
                      a thread reading the engine every second: running and waiting requests, KV
                      cache usage, prefix cache, preemptions, and the transport's `DispatchStats`
                      (tokens per expert group, per-layer load imbalance, round trips, restarts)
    expert groups     experts/metrics.py: token slots served and seconds per layer

Names and buckets are vLLM's where vLLM has the metric (`vllm:time_to_first_token_seconds` is our
`expertmesh_time_to_first_token_seconds`, with the same buckets). Labels: `model` (the served model
id) on everything, `tenant` on what one request does, and a few bounded ones (finished_reason,
route, status, limit, expert_group, layer, transport; server and tool of the configured tools).
Nothing per request or per key.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from typing import Iterable

from deployments.tenants import DEFAULT_TENANT
from router.engine import Engine, RequestOutput
from router.sequence import Status
from router.transport import LATENCY_BUCKETS

log = logging.getLogger(__name__)

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

TOOL_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

ENGINE_METRICS_INTERVAL_S = 1.0
NO_TENANT = "-"          # the `tenant` of an HTTP request no tenant was resolved for (tenant names start alphanumeric)


def _counter(name: str, description: str, model: str, *tags: str):
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=("model", *tags)).set_default_tags({"model": model})


def _gauge(name: str, description: str, model: str, *tags: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=("model", *tags)).set_default_tags({"model": model})


def start_at_zero(counter, tags: dict[str, str] | None = None) -> None:
    """Export a counter's series at 0 before its first event, so a dashboard shows 0 rather than
    nothing and `increase()` sees the first one (Prometheus' advice for counters whose labels are
    known in advance). Ray's public `inc` refuses 0; its `_record` is what `inc` calls."""
    counter._record(0, tags=tags)


def _histogram(name: str, description: str, buckets, model: str, *tags: str):
    from ray.util.metrics import Histogram

    return Histogram(name, description=description, boundaries=list(buckets),
                     tag_keys=("model", *tags)).set_default_tags({"model": model})


# -- router replicas: per request ------------------------------------------------------------------

class RouterMetrics:
    """The per-request metrics of one router replica; `request(tenant)` follows one request."""

    def __init__(self, model: str):
        self.ttft = _histogram("expertmesh_time_to_first_token_seconds",
                               "Seconds from a request's arrival at the router to its first token.",
                               TTFT_BUCKETS, model, "tenant")
        self.itl = _histogram("expertmesh_inter_token_latency_seconds",
                              "Seconds between two consecutive output tokens of a request.",
                              ITL_BUCKETS, model, "tenant")
        self.e2e = _histogram("expertmesh_e2e_request_latency_seconds",
                              "Seconds from a request's arrival at the router to its last token.",
                              REQUEST_LATENCY_BUCKETS, model, "tenant")
        self.queue = _histogram("expertmesh_request_queue_time_seconds",
                                "Seconds a request waited in the engine's queue before its first step.",
                                REQUEST_LATENCY_BUCKETS, model, "tenant")
        self.prompt_tokens = _counter("expertmesh_prompt_tokens_total",
                                      "Prompt tokens of the requests the router started.", model, "tenant")
        self.generation_tokens = _counter("expertmesh_generation_tokens_total",
                                          "Tokens the router generated.", model, "tenant")
        self.success = _counter("expertmesh_request_success_total",
                                "Requests that ended, by why: stop, length, abort (the client left) or error.",
                                model, "tenant", "finished_reason")

    def request(self, tenant: str) -> "RequestMetrics":
        return RequestMetrics(self, tenant)


class RequestMetrics:
    """One request's timeline as the router replica sees it: feed it every output, then `end`."""

    def __init__(self, metrics: RouterMetrics, tenant: str):
        self.metrics = metrics
        self.tags = {"tenant": tenant}
        self.arrival = time.monotonic()
        self.last_token: float | None = None
        self.queued = False
        self.ended = False

    def output(self, output: RequestOutput) -> None:
        m, now = self.metrics, time.monotonic()
        if output.token_ids:
            if self.last_token is None:
                m.ttft.observe(now - self.arrival, self.tags)
                if output.prompt_tokens:
                    m.prompt_tokens.inc(output.prompt_tokens, self.tags)
            else:
                m.itl.observe(now - self.last_token, self.tags)
            m.generation_tokens.inc(len(output.token_ids), self.tags)
            self.last_token = now
        if output.queue_time is not None and not self.queued:
            m.queue.observe(output.queue_time, self.tags)
            self.queued = True
        if output.finished:
            m.e2e.observe(now - self.arrival, self.tags)
            self.end(output.finish_reason)

    def end(self, reason: str | None) -> None:
        """Count the request as ended for `reason` (once; None: not counted, it never started)."""
        if not self.ended and reason is not None:
            self.metrics.success.inc(1, {**self.tags, "finished_reason": reason})
        self.ended = True


# -- router replicas: the engine's state -------------------------------------------------------------

class EngineMetrics:
    """Reads an engine's state every `interval_s` on a thread of its own and exports it.

    Gauges are set to what they read; counters advance by what the engine's own counters advanced
    since the last read. Dispatch round trips are observed as they happen, through the transport's
    `DispatchStats.on_latency` hook, on the engine thread.
    """

    def __init__(self, engine: Engine, model: str, *, tenants: Iterable[str] = (),
                 interval_s: float = ENGINE_METRICS_INTERVAL_S):
        self.engine = engine
        self.interval_s = interval_s
        self.running = _gauge("expertmesh_num_requests_running", "Requests in the engine's running batch.",
                              model, "tenant")
        self.waiting = _gauge("expertmesh_num_requests_waiting", "Requests waiting in the engine's queue.",
                              model, "tenant")
        self.kv_usage = _gauge("expertmesh_kv_cache_usage_perc",
                               "Fraction of the KV cache's blocks in use (1 means all).", model)
        self.prefix_queries = _counter("expertmesh_prefix_cache_queries_total",
                                       "Prompt tokens looked up in the prefix cache.", model)
        self.prefix_hits = _counter("expertmesh_prefix_cache_hits_total",
                                    "Prompt tokens found in the prefix cache.", model)
        self.preemptions = _counter("expertmesh_num_preemptions_total",
                                    "Requests preempted (their KV blocks freed, recomputed later).", model)
        self.group_tokens = _counter("expertmesh_expert_group_tokens_total",
                                     "Token slots (token, expert) the router sent to each expert group.",
                                     model, "expert_group")
        self.group_restarts = _counter("expertmesh_expert_group_restarts_total",
                                       "Expert-group restarts the router recovered from.", model, "expert_group")
        self.imbalance = _gauge("expertmesh_expert_load_imbalance",
                                "Per MoE layer: the busiest expert group's token slots over the mean, "
                                "averaged over the steps of the last interval with traffic (1 is even).",
                                model, "layer")
        stats = engine.transport.stats
        dispatch = _histogram("expertmesh_dispatch_latency_seconds",
                              "Seconds of one MoE layer's round trip from the router to its expert groups "
                              "and back.", LATENCY_BUCKETS, model, "transport")
        transport = {"transport": stats.transport}
        stats.on_latency = lambda seconds: dispatch.observe(seconds, transport)
        for counter in (self.prefix_queries, self.prefix_hits, self.preemptions):
            start_at_zero(counter)
        if stats.transport != "local":   # the local transport has no expert groups to count
            for g in range(stats.num_groups):
                start_at_zero(self.group_tokens, {"expert_group": str(g)})
                start_at_zero(self.group_restarts, {"expert_group": str(g)})
        self._seen = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0,
                      "group_tokens": [0] * stats.num_groups, "group_restarts": [0] * stats.num_groups,
                      "imbalance_sum": {}, "imbalance_steps": {}}
        self._tenants = set(tenants)       # known tenants read 0 from the start; others once seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expertmesh-metrics", daemon=True)
        self._thread.start()

    def collect(self) -> None:
        """Export the engine's state as of now. Reads what the engine thread writes without a lock:
        copies are taken in single steps, and a count read a moment early is exported next time."""
        engine, seen = self.engine, self._seen
        running, waiting = Tally(), Tally()
        for request in list(engine.requests.values()):
            seq = request.seq
            tenant = seq.tenant or DEFAULT_TENANT
            if seq.status is Status.RUNNING:
                running[tenant] += 1
            elif seq.status is Status.WAITING:
                waiting[tenant] += 1
        self._tenants |= running.keys() | waiting.keys()
        for tenant in self._tenants:      # a tenant with nothing left reads 0, not its last value
            self.running.set(running[tenant], {"tenant": tenant})
            self.waiting.set(waiting[tenant], {"tenant": tenant})
        self.kv_usage.set(engine.block_manager.usage)

        prefix = engine.prefix_cache_stats
        self._advance(self.prefix_queries, "prefix_queries", prefix.queries)
        self._advance(self.prefix_hits, "prefix_hits", prefix.hits)
        self._advance(self.preemptions, "preemptions", engine.scheduler.num_preemptions)

        stats = engine.transport.stats
        for g, (tokens, restarts) in enumerate(zip(list(stats.tokens_routed), list(stats.restarts))):
            tags = {"expert_group": str(g)}
            if tokens > seen["group_tokens"][g]:
                self.group_tokens.inc(tokens - seen["group_tokens"][g], tags)
                seen["group_tokens"][g] = tokens
            if restarts > seen["group_restarts"][g]:
                self.group_restarts.inc(restarts - seen["group_restarts"][g], tags)
                seen["group_restarts"][g] = restarts
        steps, sums = dict(stats.imbalance_steps), dict(stats.imbalance_sum)
        for layer, n in steps.items():
            new_steps = n - seen["imbalance_steps"].get(layer, 0)
            if new_steps > 0 and layer in sums:
                mean = (sums[layer] - seen["imbalance_sum"].get(layer, 0.0)) / new_steps
                self.imbalance.set(mean, {"layer": str(layer)})
                seen["imbalance_steps"][layer], seen["imbalance_sum"][layer] = n, sums[layer]

    def _advance(self, counter, key: str, value: int) -> None:
        if value > self._seen[key]:
            counter.inc(value - self._seen[key])
            self._seen[key] = value

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.collect()
            except Exception:  # metrics must never take the replica down; say so, try again
                log.exception("exporting the engine's metrics failed")

    def close(self) -> None:
        self._stop.set()


# -- ingress replicas -----------------------------------------------------------------------------

class IngressMetrics:
    """The metrics of one ingress replica (the deployment object's `metrics`)."""

    def __init__(self, model: str):
        self.http_requests = _counter("expertmesh_http_requests_total",
                                      "HTTP requests the ingress answered, by route template and status.",
                                      model, "tenant", "route", "method", "status")
        self.rate_limit_rejections = _counter(
            "expertmesh_rate_limit_rejections_total",
            "Requests refused (429) because their tenant was over a limit, by tenant and limit.",
            model, "tenant", "limit")
        self.tool_calls = _counter(
            "expertmesh_tool_calls_total",
            "Server-side tool calls (MCP servers, webhooks) the ingress ran, by server, tool and outcome "
            "(ok, error, timeout, invalid_arguments, invalid_output).", model, "tenant", "server", "tool", "outcome")
        self.tool_latency = _histogram(
            "expertmesh_tool_call_latency_seconds", "Seconds one server-side tool call took, whatever its outcome.",
            TOOL_LATENCY_BUCKETS, model, "tenant", "server", "tool")

    def rate_limited(self, tenant: str, limit: str) -> None:
        """Count a request refused for its tenant's `limit`: the config field's name
        (requests_per_minute, tokens_per_minute, max_concurrent_streams)."""
        self.rate_limit_rejections.inc(1, {"tenant": tenant, "limit": limit})

    def tool_call(self, tenant: str, tool, result, seconds: float) -> None:
        """Count one server-side tool call (deployments/server_tools.py). A tool of an MCP server a
        request named itself counts as server and tool `request`: its names are the client's, unbounded."""
        server, name = (tool.server_label, tool.tool_name) if tool.configured else ("request", "request")
        tags = {"tenant": tenant, "server": server, "tool": name}
        self.tool_calls.inc(1, {**tags, "outcome": result.outcome})
        self.tool_latency.observe(seconds, tags)


def _replica_ingress_metrics() -> IngressMetrics | None:
    """This ingress replica's metrics: Serve froze a copy of the FastAPI app when the deployment
    class was decorated, so the replica's deployment object is where they can be found."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        metrics = getattr(serve.get_replica_context().servable_object, "metrics", None)
    except RayServeException:                  # not in a replica (the app served some other way)
        return None
    return metrics if isinstance(metrics, IngressMetrics) else None


def _route_template(scope) -> str:
    """The path template of the route a request asked for (`/v1/models/{model_id:path}`), also for
    one refused before routing (a 401); `unmatched` for a path the app does not serve."""
    route = scope.get("route")
    if route is None:
        route = _find_route(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)
    return getattr(route, "path", None) or "unmatched"


def _find_route(routes, scope):
    """The first route whose path matches (FastAPI keeps included routers' routes one level down)."""
    from starlette.routing import Match

    for route in routes:
        inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if inner:
            found = _find_route(inner, scope)
        else:
            found = route if hasattr(route, "path") and route.matches(scope)[0] is not Match.NONE else None
        if found is not None:
            return found
    return None


class HTTPMetrics:
    """ASGI middleware of the ingress app: counts every HTTP request by route template (never the
    raw path), method, status and tenant: the one authentication resolved, or `-` where none was
    (a 401, the open /health and /ready; `-` is no tenant's name). Added last, it is the outermost
    middleware, so the requests an inner one refuses count too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500                           # an exception before the response began is a 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics = _replica_ingress_metrics()
            if metrics is not None:
                route = _route_template(scope)
                tenant = getattr((scope.get("state") or {}).get("tenant"), "name", NO_TENANT)
                metrics.http_requests.inc(1, {"tenant": tenant, "route": route, "method": scope["method"],
                                              "status": str(status)})
