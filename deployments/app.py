"""`build_app(config)`: the Serve application of one expertmesh cluster.

    serve run deployments.app:build_app                       # the defaults of ClusterConfig
    serve run config.yaml                                     # import_path: deployments.app:build_app, args: {...}
    expertmesh serve --config cluster.yaml                    # the same, from our own CLI

`args` of a Serve config are ClusterConfig's fields (model, experts, engine, ingress, router, http).
"""
from ray.serve import Application

from cluster.config import ClusterConfig
from deployments.affinity import request_router_config
from deployments.ingress import Ingress
from deployments.router import Router

# Head-room over a router's engine capacity: requests past it are refused by the router itself
# (429 with Retry-After) rather than queued by Serve where nobody sees them.
ROUTER_ONGOING_MARGIN = 16
INGRESS_MAX_ONGOING = 1024


def build_app(config: ClusterConfig) -> Application:
    """The ingress (OpenAI HTTP) bound to the router (engine + expert groups)."""
    if not isinstance(config, ClusterConfig):
        config = ClusterConfig.model_validate(config or {})
    router_options = config.router.serve_options(config.engine.capacity + ROUTER_ONGOING_MARGIN)
    if config.router.session_affinity:      # a conversation's turns to the replica holding its prefix
        router_options["request_router_config"] = request_router_config(spill_at=config.engine.max_num_seqs)
    router = Router.options(**router_options)
    ingress = Ingress.options(**config.ingress.serve_options(INGRESS_MAX_ONGOING))
    return ingress.bind(router.bind(config), config)
