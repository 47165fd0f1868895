"""The router deployment: one engine per replica, streaming token outputs to the ingress.

The replica owns an `AsyncEngine` (the engine loop on a background thread) and, through the
engine, its expert groups and their transport. It admits at most `engine.capacity` requests
(running plus queued); past that it answers `RouterBusyError`, which the ingress turns into 429
with Retry-After, so nothing waits unseen in a queue nobody bounds.
"""
from __future__ import annotations

import logging
from typing import AsyncIterator

from ray import serve

from cluster.config import ClusterConfig
from deployments.metrics import EngineMetrics, RouterMetrics
from deployments.tenants import DEFAULT_TENANT
from router.async_engine import AsyncEngine
from router.engine import Engine, RequestOutput
from router.sampling import SamplingParams

log = logging.getLogger(__name__)


class RouterBusyError(RuntimeError):
    """This replica's queue is full; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return RouterBusyError, (str(self), self.retry_after_s)


@serve.deployment(name="Router")
class Router:
    def __init__(self, config: ClusterConfig, engine_cls: type[Engine] = Engine):
        self.config = config
        self.engine = engine_cls(config.model.source, config.engine_config())
        self.async_engine = AsyncEngine(self.engine)
        self.capacity = config.engine.capacity
        self.active: set[str] = set()
        self.metrics = RouterMetrics(config.model.served_id)
        self.engine_metrics = EngineMetrics(self.engine, config.model.served_id,
                                            tenants=list(config.tenants) or [DEFAULT_TENANT])

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, tenant: str = DEFAULT_TENANT, *,
                       session: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Cancelling the call (a client that left) aborts it.
        `tenant` is the request's tenant name (fair share, metrics labels); `session` the
        conversation it continues, which the request router (deployments/affinity.py) reads to
        pick this replica: keyword only, since a request router sees keywords by name."""
        if len(self.active) >= self.capacity:
            raise RouterBusyError(f"the router replica is at capacity ({self.capacity} requests: "
                                  f"{self.config.engine.max_num_seqs} running, "
                                  f"{self.config.engine.max_queued_requests} queued); retry later",
                                  self.config.engine.retry_after_s)
        self.active.add(request_id)
        metrics = self.metrics.request(tenant)
        try:
            async for output in self.async_engine.generate(prompt_token_ids, params, request_id=request_id,
                                                           tenant=tenant, weight=self._weight(tenant)):
                metrics.output(output)
                yield output
        except ValueError:              # refused before it started: the ingress answers 400
            metrics.end(None)
            raise
        except Exception:
            metrics.end("error")
            raise
        finally:
            metrics.end("abort")        # no-op when it finished; else the caller left
            self.active.discard(request_id)

    def _weight(self, tenant: str) -> float:
        """The tenant's fair share of this replica's engine (config tenants.NAME.weight; 1 when unset)."""
        spec = self.config.tenants.get(tenant)
        return spec.weight if spec else 1.0

    def info(self) -> dict:
        """What the ingress needs to validate requests before sending them here (and /ready)."""
        self.check_health()
        engine = self.engine
        return {"model_type": engine.model_config.model_type, "max_model_len": engine.max_model_len,
                "vocab_size": engine.model_config.vocab_size, "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."),
                "expert_groups": self.config.experts.groups, "transport": self.config.experts.transport}

    def stats(self) -> dict:
        """Load, KV-cache occupancy and prefix-cache counts (prompt tokens looked up and found,
        since start) of this replica, which `replica` names (tests and operators read it)."""
        blocks = self.engine.block_manager
        prefix_cache = self.engine.prefix_cache_stats
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "active_requests": len(self.active), "engine_requests": len(self.engine.requests),
                "free_kv_blocks": blocks.num_free_blocks, "total_kv_blocks": blocks.num_blocks,
                "capacity": self.capacity, "prefix_cache_queries": prefix_cache.queries,
                "prefix_cache_hits": prefix_cache.hits}

    def check_health(self) -> None:
        """Serve's periodic health check: a dead engine thread makes the replica restart."""
        if not self.async_engine.running:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        engine_metrics = getattr(self, "engine_metrics", None)
        if engine_metrics is not None:
            engine_metrics.close()
        async_engine = getattr(self, "async_engine", None)
        if async_engine is not None:
            async_engine.shutdown()
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()
