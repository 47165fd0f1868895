"""The cluster config schema: the embedded default `make run` serves, YAML files, and the `args`
of a Serve config (`import_path: deployments.app:build_app`) all land in one ClusterConfig."""
from __future__ import annotations

import pytest
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from cluster.config import ClusterConfig
from deployments import app as app_module


def test_make_run_default_is_smollm2_with_two_collective_expert_groups():
    config = ClusterConfig.embedded_default()
    assert config.model.source == "smollm2-moe" and config.model.served_id == "smollm2-moe"
    assert (config.experts.groups, config.experts.transport) == (2, "collective")
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8000)
    assert not config.tenants and not config.grpc.enabled       # an open API stays on loopback HTTP
    engine = config.engine_config()
    assert (engine.expert_groups, engine.transport, engine.max_num_seqs) == (2, "collective", 32)
    assert engine.max_model_len == config.model.max_model_len


def test_yaml_file_round_trip_and_errors_name_the_field(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "/ckpt/qwen3", "id": "qwen"},
                                    "experts": {"groups": 4, "transport": "grpc"},
                                    "router": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                                      "target_ongoing_requests": 16}}}))
    config = ClusterConfig.from_yaml(path)
    assert config.model.served_id == "qwen" and config.experts.groups == 4
    assert config.router.autoscaling_config.max_replicas == 3
    path.write_text("model:\n  sorce: /x\n")
    with pytest.raises(ValueError, match=r"cluster.yaml: model.sorce: unknown field"):
        ClusterConfig.from_yaml(path)
    path.write_text("experts: {groups: 3}\n")
    with pytest.raises(ValueError, match="transport 'local'"):
        ClusterConfig.from_yaml(path)
    path.write_text("router: {autoscaling_config: {min_replicas: 4, max_replicas: 2}}\n")
    with pytest.raises(ValueError, match="max_replicas"):
        ClusterConfig.from_yaml(path)


def test_serve_config_args_build_the_app_with_the_schema_options():
    args = {"model": {"source": "smollm2-moe"},
            "engine": {"max_num_seqs": 8, "max_queued_requests": 24},
            "ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
            "router": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}}
    # What `serve run` / `serve deploy` do with import_path: deployments.app:build_app and these args.
    application = call_user_app_builder_with_args_if_necessary(app_module.build_app, args)
    ingress = application._bound_deployment
    router, config = ingress.init_args[0]._bound_deployment, ingress.init_args[1]
    assert isinstance(config, ClusterConfig) and config.engine.capacity == 32
    assert (ingress.name, router.name) == ("Ingress", "Router")
    assert ingress.num_replicas == 2 and ingress.ray_actor_options["num_cpus"] == 0.5
    assert router.max_ongoing_requests == 32 + app_module.ROUTER_ONGOING_MARGIN
    assert router._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(Exception, match="unknown|Extra inputs"):
        call_user_app_builder_with_args_if_necessary(app_module.build_app, {"modle": {}})
