"""What an expert group reports to Prometheus, through Ray's metrics agent on its node.

Recorded on the group's side of the transport, per MoE layer it serves; exported (with Ray's
`ray_` prefix) next to the router's view of the same traffic (deployments/metrics.py):

    expertmesh_expert_group_served_tokens_total{model, expert_group}   token slots it computed
    expertmesh_expert_group_step_seconds{model, expert_group}          one layer's work, payload in to reply out

The router's `expertmesh_expert_group_tokens_total` counts the slots it sent; without failures the
two agree. Only a group running inside Ray records (a group built directly, in a test, does not).
"""
from __future__ import annotations

# One layer's expert work: 0.1 ms to 1 s, as the router's round-trip histogram (router/transport.py).
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GroupMetrics:
    def __init__(self, model: str, group: int):
        from ray.util.metrics import Counter, Histogram

        tags = {"model": model, "expert_group": str(group)}
        self.served_tokens = Counter(
            "expertmesh_expert_group_served_tokens_total",
            description="Token slots (token, expert) this expert group computed.",
            tag_keys=tuple(tags)).set_default_tags(tags)
        self.step_seconds = Histogram(
            "expertmesh_expert_group_step_seconds",
            description="Seconds an expert group spends on one MoE layer of a step: from its payload "
                        "received to its reply sent (collective) or returned (grpc).",
            boundaries=list(STEP_BUCKETS), tag_keys=tuple(tags)).set_default_tags(tags)
        self.served_tokens._record(0, tags=None)   # exported at 0 before the first step (Ray's inc refuses 0)

    def served(self, slots: int, seconds: float) -> None:
        if slots:
            self.served_tokens.inc(slots)
        self.step_seconds.observe(seconds)

    @classmethod
    def in_ray(cls, model: str, group: int) -> "GroupMetrics | None":
        """Metrics for a group running as a Ray actor; None outside Ray."""
        import ray

        return cls(model, group) if ray.is_initialized() else None
