"""`expertmesh serve --config FILE` as a user runs it: it joins the cluster in RAY_ADDRESS, deploys,
prints the OpenAI base URL and where metrics are scraped, answers there, and stops cleanly on Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests import chat_checkpoints
from tests.serving import tiny_config


def test_serve_command_deploys_prints_urls_and_stops_on_ctrl_c(serve_url, tmp_path):
    import ray
    from ray import serve

    config = tiny_config("cli", chat_checkpoints.qwen3_moe(tmp_path / "qwen3"))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                               cwd=Path(__file__).parent.parent)
    try:
        line = process.stdout.readline()
        assert "OpenAI API at" in line, line
        base = line.rsplit(" ", 1)[1].strip()
        assert base == f"{serve_url}/cli/v1"              # the running proxy's port, not the config's
        with urllib.request.urlopen(base + "/models", timeout=60) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny-cli"]
        printed = [line]
        while printed[-1] and "Ctrl-C to stop" not in printed[-1]:
            printed.append(process.stdout.readline())
        scrape = next(p.split()[2] for p in printed if p.strip().startswith("metrics (Prometheus)"))
        deadline, served = time.monotonic() + 60, []
        while not served and time.monotonic() < deadline:                  # Ray reports each second
            with urllib.request.urlopen(scrape, timeout=60) as response:      # Ray's node metrics port
                served = [s for s in response.read().decode().splitlines()
                          if s.startswith("ray_expertmesh_http_requests_total{") and 'model="tiny-cli"' in s]
            time.sleep(0.5)
        assert served                                                        # the /models call above
        # The gRPC API on the running Serve instance's gRPC proxy, as printed.
        import grpc

        from protos import expertmesh_pb2 as pb, expertmesh_pb2_grpc as pb_grpc

        target = next(p.split()[1] for p in printed if p.strip().startswith("gRPC "))
        with grpc.insecure_channel(target) as channel:
            health = pb_grpc.InferenceStub(channel).Health(pb.HealthRequest(), metadata=[("application", "cli")],
                                                          timeout=60)
        assert health.status == pb.HealthResponse.SERVING and health.model == "tiny-cli"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while "cli" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "cli" not in serve.status().applications
