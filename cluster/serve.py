"""`expertmesh serve [--config FILE]`: deploy the cluster's Serve app and keep it up until Ctrl-C.

Connects to the Ray cluster at $RAY_ADDRESS, or starts a local one; starts Serve's HTTP proxy
where the config says (http.host, http.port) and its gRPC proxy with the public gRPC API (grpc),
deploys `deployments.app:build_app(config)`, prints the URLs, and blocks. Ctrl-C deletes the app
(and shuts down the local Ray it started).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cluster.config import ClusterConfig


def load(config_path: Path | None) -> ClusterConfig:
    return ClusterConfig.from_yaml(config_path) if config_path else ClusterConfig.embedded_default()


def http_address(config: ClusterConfig) -> tuple[str, int]:
    """Where Serve's proxy really listens: a Serve instance already running on the cluster keeps
    the HTTP options it was started with, whatever this config says."""
    try:
        from ray.serve.context import _get_global_client

        options = _get_global_client().get_serve_details()["http_options"]
        return options["host"], int(options["port"])
    except Exception:  # an older or newer Serve without these details: trust the config
        return config.http.host, config.http.port


def grpc_address() -> tuple[str, int] | None:
    """Where the running Serve instance's gRPC proxy listens (it binds every interface), or None
    when it runs none: like the HTTP options, those of the Serve instance already running win."""
    from ray.serve.context import _get_global_client

    try:
        options = _get_global_client().get_serve_details().get("grpc_options") or {}
    except Exception:  # an older or newer Serve without these details
        return None
    if not options.get("grpc_servicer_functions"):
        return None
    return "0.0.0.0", int(options["port"])


def metrics_urls() -> list[str]:
    """Where Prometheus scrapes the cluster: each live Ray node's metrics export port, which serves
    Ray's, Serve's and expertmesh's metrics of that node's processes (`ray_expertmesh_*`; the port
    the Helm chart names `metrics`). A local Ray started here picks a free port."""
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node["Alive"] and node.get("MetricsExportPort")]


def urls(config: ClusterConfig, address: tuple[str, int] | None = None) -> dict[str, str]:
    host, port = address or (config.http.host, config.http.port)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{host}:{port}{config.http.route_prefix.rstrip('/')}"
    return {"openai": f"{base}/v1", "health": f"{base}/health", "ready": f"{base}/ready"}


def run(config_path: Path | None, *, block: bool = True) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app

    config = load(config_path)
    address = os.environ.get("RAY_ADDRESS")
    started_ray = not ray.is_initialized() and not address
    if not ray.is_initialized():
        ray.init(address=address or None, configure_logging=False)
    serve.start(http_options={"host": config.http.host, "port": config.http.port},
                grpc_options=config.grpc.serve_options())
    print(f"expertmesh: deploying {config.model.served_id!r} ({config.experts.groups} expert group(s), "
          f"{config.experts.transport} transport) as Serve app {config.name!r}", file=sys.stderr)
    serve.run(build_app(config), name=config.name, route_prefix=config.http.route_prefix)
    if not config.tenants and not os.environ.get("EXPERTMESH_API_KEYS_DIR"):
        print("expertmesh: WARNING: no tenants are configured: the API is open, every request is served "
              "without an API key (see `tenants` in cluster/config.py)", file=sys.stderr)
        if config.grpc.enabled:
            print(f"expertmesh: WARNING: the open gRPC API listens on every network interface (port "
                  f"{config.grpc.port}): Serve's gRPC proxy cannot bind one address", file=sys.stderr)
    links = urls(config, http_address(config))
    print(f"expertmesh: serving {config.model.served_id} — OpenAI API at {links['openai']}")
    print(f"  health {links['health']}   ready {links['ready']}")
    grpc = grpc_address()
    if grpc:
        print(f"  gRPC 127.0.0.1:{grpc[1]} (expertmesh.v1.Inference on every interface, docs/grpc.md; "
              f"metadata application: {config.name})")
    scrape = metrics_urls()
    if scrape:
        more = f" (and {len(scrape) - 1} more Ray nodes, each its own)" if len(scrape) > 1 else ""
        print(f"  metrics (Prometheus) {scrape[0]}{more}")
    print(f"  curl {links['openai']}/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{config.model.served_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'")
    print("Ctrl-C to stop.", flush=True)
    if not block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nexpertmesh: stopping", file=sys.stderr)
    finally:
        serve.delete(config.name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
