"""The Helm chart (helm/expertmesh), rendered and checked offline: no cluster is reachable here.

Each check uses a reference nobody here wrote: Helm's own Go SDK renders and lints (strict), the
Kubernetes 1.31 OpenAPI schemas judge every built-in kind (and each Ray pod template as a Pod),
KubeRay's RayService CRD judges the RayService with unknown fields rejected, Ray Serve's own
schema judges serveConfigV2, and its args load into cluster.config.ClusterConfig, then go through
Serve's own application-builder call into deployments.app:build_app.

Cases: the chart's defaults, the GPU production file in helm/expertmesh/ci/, a case with what the
other two leave off (a gRPC port and timeout, chart-created Secrets), and values that must be rejected, readably.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "expertmesh"
CRD = ROOT / "helm" / "crds-for-tests" / "ray.io_rayservices.yaml"
SHARED_CRD = ROOT.parent / "shared" / "k8s" / "crds" / "ray.io_rayservices.yaml"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "demo", "llm"

# Kinds that are not built into Kubernetes: the RayService is checked against KubeRay's CRD below.
CUSTOM_KINDS = {"RayService", "PodMonitor"}

# What the default values and the production file leave off: a gRPC call timeout, Secrets created by the chart.
EXTRAS = {
    "grpc": {"service": {"type": "LoadBalancer"}},
    "apiKeys": {"keys": {"team-a": "sk-team-a-0123456789", "team-b": "sk-team-b-9876543210"}},
    "sessionStore": {"url": "postgresql://expertmesh:secret@postgres.db:5432/sessions"},
    "config": {"experts": {"transport": "grpc", "groups": 2}, "engine": {"num_kv_blocks": 4096},
               "grpc": {"port": 9090, "request_timeout_s": 600}},
    "metrics": {"podMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": False}},
    "expertWorkers": {"gpusPerPod": 4},
}
CASES = {
    "defaults": None,
    "ci-gpu-production": yaml.safe_load((CHART / "ci" / "gpu-production-values.yaml").read_text()),
    "grpc-and-secrets": EXTRAS,
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values) -> list[dict]:
    """The manifests a `helm install` of these values would apply (NOTES.txt aside)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.fixture(scope="module", params=list(CASES))
def case(request, chart):
    values = CASES[request.param]
    return request.param, values, render(chart, values)


def the(docs, kind) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def merged(chart, values) -> dict:
    return chart.merge_values(values)


def serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def worker_groups(rayservice) -> dict[str, dict]:
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


# -- Helm itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_lint_strict(name):
    report = helm.lint(CHART, CASES[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    findings = [m for m in report["messages"] if m["severity"] >= 2]   # 2 warning, 3 error
    assert not report["errors"] and not findings, report


# -- Kubernetes' own schemas -------------------------------------------------------------------------


def test_builtin_kinds_valid_for_kubernetes_1_31(case):
    _, _, docs = case
    kinds = {d["kind"] for d in docs}
    assert "RayService" in kinds
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_ray_pod_templates_valid_as_pods(case):
    """KubeRay turns each group's template into Pods: Kubernetes' Pod schema must accept them."""
    _, _, docs = case
    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "ray-pod", **template.get("metadata", {})}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


# -- KubeRay's CRD -----------------------------------------------------------------------------------


def strict(schema):
    """A CRD's structural schema as JSON Schema that rejects unknown fields, as the API server's
    strict field validation does: objects with declared properties allow no others unless the
    schema says x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_validator():
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_rayservice_valid_against_kuberay_crd(case, rayservice_validator):
    _, _, docs = case
    rayservice = the(docs, "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator.iter_errors(rayservice), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_crd_validator_rejects_unknown_fields(chart, rayservice_validator):
    """The check above would catch a misspelt field (it is not vacuous)."""
    rayservice = the(render(chart, None), "RayService")
    bad = copy.deepcopy(rayservice)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "x"
    messages = [e.message for e in rayservice_validator.iter_errors(bad)]
    assert any("'replica' was unexpected" in m for m in messages), messages
    assert any("'imagePolicy' was unexpected" in m for m in messages), messages


@pytest.mark.skipif(not SHARED_CRD.exists(), reason="no ../shared/k8s/crds beside this checkout")
def test_vendored_crd_equals_shared():
    assert CRD.read_bytes() == SHARED_CRD.read_bytes(), (
        f"{CRD.relative_to(ROOT)} differs from {SHARED_CRD}: copy the shared file over it")


# -- serveConfigV2: Serve's schema, then our own -----------------------------------------------------


def test_serve_config_loads_into_cluster_config(case, chart, tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_app

    _, values, docs = case
    serve = ServeDeploySchema.model_validate(serve_config(the(docs, "RayService")))
    [app] = serve.applications
    assert app.import_path == "deployments.app:build_app"

    # The loader the CLI uses for a config file ...
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(app.args))
    config = ClusterConfig.from_yaml(config_file)
    # ... and what Serve does with import_path and args.
    application = call_user_app_builder_with_args_if_necessary(build_app, app.args)
    assert type(application).__name__ == "Application"

    # The values arrive as given, under the same names.
    want = merged(chart, values)["config"]
    assert config.name == app.name == want["name"]
    assert config.model.source == want["model"]["source"]
    assert config.experts.groups == want["experts"]["groups"]
    assert config.experts.transport == want["experts"]["transport"]
    assert config.engine.max_num_seqs == want["engine"]["max_num_seqs"]
    assert app.route_prefix == config.http.route_prefix == want["http"]["route_prefix"]
    assert serve.http_options.host == "0.0.0.0" and serve.http_options.port == config.http.port
    # The router replica asks for its GPU and for the resource only router pods offer.
    assert config.router.ray_actor_options["num_gpus"] == 1
    assert config.router.ray_actor_options["resources"] == {"expertmesh_router": 1}


def test_values_mirror_cluster_config():
    """values.schema.json's `config` is ClusterConfig, field for field: nothing the chart passes
    can be rejected as unknown, and no field of the schema lacks a value."""
    from ray.serve.config import AutoscalingConfig

    chart_config = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    chart_owned = {("http", "host")}          # always 0.0.0.0 in a pod

    def compare(model, schema, path=()):
        fields, keys = set(model.model_fields), set(schema["properties"])
        unknown = keys - fields
        assert not unknown, f"values config.{'.'.join(path)} has keys ClusterConfig lacks: {sorted(unknown)}"
        missing = {f for f in fields - keys if path + (f,) not in chart_owned}
        assert not missing, (f"ClusterConfig.{'.'.join(path) or '<root>'} has fields the chart lacks: "
                             f"{sorted(missing)}; add them to helm/expertmesh/values.yaml and values.schema.json")
        for name in keys:
            annotation = model.model_fields[name].annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                compare(annotation, schema["properties"][name], path + (name,))

    compare(ClusterConfig, chart_config)
    for deployment in ("ingress", "router"):
        autoscaling = chart_config["properties"][deployment]["properties"]["autoscaling_config"]
        assert set(autoscaling["properties"]) <= set(AutoscalingConfig.model_fields)


# -- what the chart derives --------------------------------------------------------------------------


def test_cluster_layout_defaults(chart):
    rayservice = the(render(chart, None), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    [container] = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    groups = worker_groups(rayservice)
    assert set(groups) == {"router", "experts"}
    # 1 router replica x 4 expert groups / 1 GPU per pod.
    assert (groups["router"]["minReplicas"], groups["router"]["replicas"], groups["router"]["maxReplicas"]) == (1, 1, 1)
    assert (groups["experts"]["minReplicas"], groups["experts"]["replicas"], groups["experts"]["maxReplicas"]) == (4, 4, 4)
    for name, gpus in (("router", 1), ("experts", 1)):
        [container] = groups[name]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert groups["router"]["resources"] == {"expertmesh_router": "1"}
    assert cluster["enableInTreeAutoscaling"] is False


def test_cluster_layout_follows_router_autoscaling(chart):
    values = CASES["ci-gpu-production"]
    rayservice = the(render(chart, values), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == values["autoscaler"]["idleTimeoutSeconds"]
    groups = worker_groups(rayservice)
    # Router replicas 1..3 (2 at first); each has 8 expert groups, and an expert pod holds 8 GPUs.
    assert [groups["router"][k] for k in ("minReplicas", "replicas", "maxReplicas")] == [1, 2, 3]
    assert [groups["experts"][k] for k in ("minReplicas", "replicas", "maxReplicas")] == [1, 2, 3]
    [container] = groups["experts"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    spec = groups["experts"]["template"]["spec"]
    assert spec["nodeSelector"] == values["expertWorkers"]["nodeSelector"]
    assert spec["tolerations"] == values["expertWorkers"]["tolerations"]
    assert groups["router"]["template"]["spec"]["affinity"] == values["routerWorkers"]["affinity"]
    assert {"name": "NCCL_IB_DISABLE", "value": "0"} in container["env"]
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in container["env"]
    assert container["image"] == "registry.example.com/ml/expertmesh:0.1.0-cu128"


def test_expert_pods_round_up_and_local_transport_needs_none(chart):
    # 3 groups on 2-GPU pods: 2 pods for one router replica.
    values = {"config": {"experts": {"groups": 3}}, "expertWorkers": {"gpusPerPod": 2}}
    assert worker_groups(the(render(chart, values), "RayService"))["experts"]["replicas"] == 2
    local = {"config": {"experts": {"groups": 1, "transport": "local"}}}
    assert set(worker_groups(the(render(chart, local), "RayService"))) == {"router"}


def test_weights_keys_and_session_store_reach_every_ray_pod(chart):
    docs = render(chart, EXTRAS)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    keys, store = secrets[f"{RELEASE}-expertmesh-api-keys"], secrets[f"{RELEASE}-expertmesh-session-store"]
    assert keys["stringData"] == EXTRAS["apiKeys"]["keys"]
    assert store["stringData"] == {"url": EXTRAS["sessionStore"]["url"]}
    claim = the(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert volumes["api-keys"]["secret"]["secretName"] == keys["metadata"]["name"]
        [container] = spec["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
        env = {e["name"]: e for e in container["env"]}
        assert env["EXPERTMESH_API_KEYS_DIR"]["value"] == mounts["api-keys"]["mountPath"]
        assert env["EXPERTMESH_SESSION_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": store["metadata"]["name"], "key": "url"}


def test_existing_claim_and_secrets_are_used_not_created(chart):
    values = CASES["ci-gpu-production"]
    docs = render(chart, values)
    assert not [d for d in docs if d["kind"] in ("Secret", "PersistentVolumeClaim")]
    spec = worker_groups(the(docs, "RayService"))["router"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "qwen3-235b-weights"
    assert volumes["api-keys"]["secret"]["secretName"] == "expertmesh-tenant-keys"
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["EXPERTMESH_SESSION_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "expertmesh-postgres", "key": "connection-string"}


@pytest.mark.parametrize("values,port", [(None, 9000), (EXTRAS, 9090)])
def test_grpc_proxy_and_service(chart, values, port):
    docs = render(chart, values)
    serve = serve_config(the(docs, "RayService"))
    # Serve's grpc_options are what `expertmesh serve` starts for the same config.
    [app] = serve["applications"]
    assert serve["grpc_options"] == ClusterConfig.model_validate(app["args"]).grpc.serve_options()
    assert serve["grpc_options"]["port"] == port and serve["grpc_options"]["enable_reflection"] is True
    service = the(docs, "Service")
    assert service["spec"]["selector"]["ray.io/serve"] == "true"
    assert service["spec"]["ports"] == [{"name": "grpc", "port": port, "targetPort": "grpc", "appProtocol": "grpc"}]
    for group in worker_groups(the(docs, "RayService")).values():
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["grpc"] == port and ports["serve"] == 8000 and ports["metrics"] == 8080


def test_grpc_disabled_renders_no_proxy_and_no_service(chart):
    plain = render(chart, {"config": {"grpc": {"enabled": False}}})
    assert "grpc_options" not in serve_config(the(plain, "RayService"))
    assert not [d for d in plain if d["kind"] == "Service"]
    for group in worker_groups(the(plain, "RayService")).values():
        assert "grpc" not in {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}


def test_podmonitor_scrapes_the_ray_metrics_port(chart):
    assert not [d for d in render(chart, None) if d["kind"] == "PodMonitor"]
    docs = render(chart, CASES["ci-gpu-production"])
    monitor = the(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:    # every Ray pod is selected and names the port
        assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert {"name": "metrics", "containerPort": 8080} in template["spec"]["containers"][0]["ports"]
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_grafana_dashboard(chart):
    configmap = the(render(chart, None), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["expertmesh.json"])
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Time to first token", "Inter-token latency", "Throughput", "Queue depth", "KV cache usage",
            "Expert-group load", "Expert load imbalance", "Dispatch latency",
            "Rate-limit rejections per tenant"} <= titles
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- rejected values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    ({"config": {"experts": {"group": 4}}}, "at '/config/experts': additional properties 'group' not allowed"),
    ({"config": {"experts": {"groups": "four"}}}, "at '/config/experts/groups': got string, want integer"),
    ({"config": {"experts": {"transport": "nccl"}}}, "/config/experts/transport"),
    ({"config": {"engine": {"max_num_seqs": 0}}}, "/config/engine/max_num_seqs"),
    ({"expertWorkers": {"gpusPerPod": 0}}, "/expertWorkers/gpusPerPod"),
    ({"head": {"rayStartParams": {"num-gpus": 1}}}, "/head/rayStartParams/num-gpus"),
    ({"routerWorkers": {"resources": {"limits": {"cpu": True}}}}, "/routerWorkers/resources/limits/cpu"),
    ({"config": {"router": {"ray_actor_options": {"num_gpus": 2}}}},
     "at '/config/router/ray_actor_options': additional properties 'num_gpus' not allowed"),
    ({"config": {"experts": {"transport": "local"}}},
     "config.experts.transport 'local' keeps every expert in the router's process: set config.experts.groups to 1"),
    ({"config": {"experts": {"assignment": "balanced"}}}, "needs config.experts.routing_counts"),
    ({"config": {"model": {"source": "/data/gpt-oss-20b"}}},
     'config.model.source "/data/gpt-oss-20b" is not on the model volume'),
    ({"config": {"router": {"autoscaling_config": {"min_replicas": 4, "max_replicas": 2}}}},
     "min_replicas (4) is above max_replicas (2)"),
])
def test_invalid_values_rejected_readably(chart, values, message):
    with pytest.raises(helm.HelmError) as error:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert message in str(error.value)


# -- documentation -----------------------------------------------------------------------------------

# Keys below these are the user's own maps or Kubernetes/Ray objects, documented where they are used.
FREE_FORM = {"resources", "autoscaling_config", "ray_actor_options", "labels", "annotations", "podLabels",
             "podAnnotations", "nodeSelector", "affinity", "rayStartParams", "keys", "tolerations", "env"}


def test_every_value_is_documented():
    """Each key of values.yaml has a comment of its own right above it."""
    undocumented, stack, previous = [], [], ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            stack = [(i, k) for i, k in stack if i < indent]
            if not any(k in FREE_FORM for _, k in stack) and not previous.lstrip().startswith("#"):
                undocumented.append(".".join([k for _, k in stack] + [key]))
            stack.append((indent, key))
        if line.strip():
            previous = line
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


# -- the serving image -------------------------------------------------------------------------------


def test_dockerfile_installs_every_package_and_the_pinned_torch():
    """The image the chart runs has every package pyproject installs, and the Makefile's torch."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.M))
    assert packages <= copied, f"the Dockerfile does not COPY {sorted(packages - copied)}"
    [torch_pin] = re.findall(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]
