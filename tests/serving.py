"""Deploying an expertmesh app on the session's Serve instance, for the serving tests."""
from __future__ import annotations

import contextlib
from pathlib import Path

from cluster.config import ClusterConfig


def tiny_config(name: str, checkpoint: Path, **sections) -> ClusterConfig:
    """A small, CPU-only config for a tiny test checkpoint, mounted at /<name>."""
    raw = {
        "name": name,
        "model": {"source": str(checkpoint), "id": f"tiny-{name}", "device": "cpu", "dtype": "float32",
                  "max_model_len": 512},
        "engine": {"num_kv_blocks": 160, "block_size": 16, "max_num_seqs": 4, "max_queued_requests": 4,
                   "max_num_batched_tokens": 512},
        "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        "router": {"ray_actor_options": {"num_cpus": 0.1}},
        "http": {"route_prefix": f"/{name}"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return ClusterConfig.model_validate(raw)


@contextlib.contextmanager
def deployed(config: ClusterConfig, serve_url: str):
    """Run the app until the block ends; yields its base URL (OpenAI clients add /v1)."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(config), name=config.name, route_prefix=config.http.route_prefix)
    try:
        yield serve_url.rstrip("/") + config.http.route_prefix
    finally:
        serve.delete(config.name)


def router_stats(config: ClusterConfig) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=config.name).stats.remote().result()
