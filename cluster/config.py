"""The one typed config of an expertmesh cluster.

A YAML file (`expertmesh serve --config FILE`), the `args` of a Serve config
(`import_path: deployments.app:build_app`) and the Helm chart's values all map
onto `ClusterConfig`. Every field has a description; unknown fields are errors.

    model:       which checkpoint, the id clients ask for, device, dtype, context length
    experts:     expert groups, transport, assignment and placement (EngineConfig's expert fields)
    engine:      KV cache, batching limits and the router's bounded queue
    ingress:     Serve options of the OpenAI HTTP deployment (replicas, autoscaling, resources)
    router:      Serve options of the router deployment (one engine per replica), session affinity
    http:        where Serve's HTTP proxy listens (used by `expertmesh serve`)
    grpc:        Serve's gRPC proxy with the public gRPC API: port, reflection (`expertmesh serve`, Helm)
    tenants:     API keys (hashed), fair-share weights and limits of each tenant; none: an open service
    sessions:    the Responses API's store (SQLite, PostgreSQL) and long-conversation policy
    tools:       server-side tools (MCP servers, webhooks) the service calls for the model; per tenant too
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray.serve.config import AutoscalingConfig

DEFAULT_CONFIG = "smollm2-moe.yaml"     # the embedded default `make run` serves, in cluster/defaults/


def describe(error: ValidationError) -> str:
    """A validation error as `section.field: problem; ...`."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    source: str = Field("smollm2-moe", description=(
        "A Hugging Face checkpoint directory (config.json, safetensors, tokenizer files), or "
        "'smollm2-moe', the embedded default model (converted once into $EXPERTMESH_CACHE)."))
    id: str | None = Field(None, description=(
        "The model id clients send in `model` and /v1/models lists. Default: 'smollm2-moe' "
        "for the embedded model, else the checkpoint directory's name."))
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU; on CPU bfloat16 where it has bf16 instructions, else float32")
    max_model_len: int | None = Field(None, ge=1, description=(
        "Context length in tokens (prompt plus completion). Default: the model's, capped by the KV cache."))

    @property
    def served_id(self) -> str:
        return self.id or Path(self.source).name


class ExpertsSection(_Section):
    groups: int = Field(1, ge=1, description=(
        "Expert-group actors the experts of every MoE layer are split over. 1 with transport "
        "'local' keeps them in the router's process."))
    transport: Literal["local", "collective", "grpc"] = Field("local", description=(
        "How the router reaches its expert groups: in-process, a torch.distributed process group "
        "(NCCL on GPU, gloo on CPU), or gRPC."))
    assignment: Literal["contiguous", "balanced"] = Field("contiguous", description=(
        "Which experts each group holds: contiguous ranges, or balanced by measured routing counts."))
    routing_counts: str | None = Field(None, description="JSON file of measured routing counts, for 'balanced'")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the expert groups")
    overlap: bool = Field(False, description=(
        "Overlap one decode micro-batch's attention with another's expert round trip."))
    group_timeout_s: float = Field(60.0, gt=0, description="How long to wait for a failed expert group to restart")


class EngineSection(_Section):
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; overrides kv_cache_memory_gb")
    kv_cache_memory_gb: float | None = Field(None, gt=0, description=(
        "KV-cache size. Default: 2 GiB on CPU, 80% of free GPU memory."))
    max_num_seqs: int = Field(128, ge=1, description="Sequences one router replica runs at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Tokens per engine step (chunked prefill)")
    enable_prefix_caching: bool = Field(True, description="Share KV blocks of equal prompt prefixes")
    max_queued_requests: int = Field(256, ge=0, description=(
        "Requests a router replica holds beyond max_num_seqs. When running plus queued requests "
        "reach max_num_seqs + max_queued_requests, new requests get 429 with Retry-After."))
    retry_after_s: int = Field(1, ge=1, description="The Retry-After a full router replica answers with")

    @property
    def capacity(self) -> int:
        """Requests one router replica accepts before it answers 429."""
        return self.max_num_seqs + self.max_queued_requests


class DeploymentSection(_Section):
    num_replicas: int = Field(1, ge=1, description="Replicas, when autoscaling_config is not set")
    autoscaling_config: AutoscalingConfig | None = Field(None, description=(
        "Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...); "
        "replaces num_replicas."))
    max_ongoing_requests: int | None = Field(None, ge=1, description=(
        "Requests Serve sends one replica at once. Default: 1024 for the ingress; for the router, "
        "its engine capacity (max_num_seqs + max_queued_requests) plus a margin, so that the router "
        "itself answers 429 when full instead of Serve queueing silently."))
    ray_actor_options: dict[str, Any] = Field(default_factory=dict, description=(
        "Ray actor options of each replica (num_cpus, num_gpus, resources, runtime_env, ...)"))

    @field_validator("autoscaling_config", mode="before")
    @classmethod
    def _autoscaling(cls, value):
        return AutoscalingConfig(**value) if isinstance(value, dict) else value

    def serve_options(self, default_max_ongoing: int) -> dict[str, Any]:
        """The options of `serve.deployment(...)` this section describes."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or default_max_ongoing,
            "ray_actor_options": dict(self.ray_actor_options),
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_unset=True)
        else:
            options["num_replicas"] = self.num_replicas
        return options


class RouterSection(DeploymentSection):
    session_affinity: bool = Field(True, description=(
        "Send every request of a conversation (a Responses API conversation, or a request's "
        "prompt_cache_key) to the same router replica, where its prefix is in the KV cache; a "
        "replica already running max_num_seqs requests is passed over. false: Serve's power of "
        "two choices for every request."))


class HttpSection(_Section):
    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to")
    port: int = Field(8000, ge=0, le=65535, description="Port of Serve's HTTP proxy")
    route_prefix: str = Field("/", description="Where the OpenAI API is mounted (/v1/... below it)")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {value!r}")
        return value


class GrpcSection(_Section):
    enabled: bool = Field(True, description=(
        "Start Serve's gRPC proxy with the public gRPC API (expertmesh.v1.Inference, "
        "protos/expertmesh.proto) next to the HTTP one. It binds every interface (Serve's choice)."))
    port: int = Field(9000, ge=1, le=65535, description="Port of Serve's gRPC proxy")
    reflection: bool = Field(True, description=(
        "gRPC server reflection, so grpcurl and grpcui can list and call the API without the .proto file"))
    request_timeout_s: float | None = Field(None, gt=0, description=(
        "End-to-end limit of one gRPC call in Serve's proxy (DEADLINE_EXCEEDED past it); unset: none"))

    def serve_options(self) -> dict[str, Any] | None:
        """Serve's `grpc_options` (serve.start, a Serve config's grpc_options); None when disabled."""
        if not self.enabled:
            return None
        from deployments.grpc_api import SERVICER_FUNCTION

        options: dict[str, Any] = {"port": self.port, "grpc_servicer_functions": [SERVICER_FUNCTION],
                                   "enable_reflection": self.reflection}
        if self.request_timeout_s is not None:
            options["request_timeout_s"] = self.request_timeout_s
        return options


class SessionsSection(_Section):
    store: Literal["auto", "sqlite", "postgresql"] = Field("auto", description=(
        "Where the Responses API keeps responses and conversations: 'sqlite' (a file under data_dir; "
        "one machine), 'postgresql' (a server every ingress replica shares), or 'auto': postgresql "
        "when a store URL is given (store_url or $EXPERTMESH_SESSION_STORE_URL), else sqlite."))
    store_url: str | None = Field(None, description=(
        "postgresql://user:password@host:5432/db of the shared store. Default: "
        "$EXPERTMESH_SESSION_STORE_URL (the Helm chart sets it from a Secret)."))
    data_dir: str | None = Field(None, description=(
        "Directory of the SQLite store (created on demand). Default: $EXPERTMESH_DATA_DIR, else "
        "~/.local/share/expertmesh."))
    context_policy: Literal["error", "truncate", "summarize"] = Field("error", description=(
        "When a conversation outgrows the context: 'error' answers 400 with both token counts; "
        "'truncate' drops the oldest turns; 'summarize' has the model condense the oldest turns into "
        "a note stored with the conversation. Instructions and the latest turns always stay. A "
        "request's truncation 'auto' asks for truncate (or summarize, when configured); 'disabled' for error."))
    keep_turns: int = Field(2, ge=0, description=(
        "Earlier turns kept verbatim when truncate or summarize shortens a conversation (fewer when "
        "even those do not fit); the current turn always stays."))
    summary_max_tokens: int = Field(256, ge=8, description="Length limit of the note 'summarize' writes")
    reserved_output_tokens: int = Field(256, ge=1, description=(
        "Room kept for the answer when a request sets no max_output_tokens and the policy decides "
        "whether the conversation still fits."))

    @field_validator("store_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("store_url must be a postgresql:// URL (SQLite is configured with data_dir)")
        return value


TOOL_NAME = r"^[A-Za-z0-9_\-]{1,64}$"          # a function name every chat format can carry
SERVER_LABEL = r"^[A-Za-z0-9_\-]{1,64}$"
WEBHOOK_LABEL = "webhook"                      # the server_label webhook calls are reported under


def _http_url(value: str, what: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not echoed: a URL may carry a credential in its query.
        raise ValueError(f"{what} must be an http:// or https:// URL with a host")
    return value


class SecretHeaders(_Section):
    env: str | None = Field(None, description=(
        "Environment variable holding the headers: a JSON object of header name -> value, e.g. "
        "{\"Authorization\": \"Bearer ...\"}"))
    file: str | None = Field(None, description=(
        "File holding the headers as that JSON object (a mounted Kubernetes Secret); read on each use, "
        "so a rotated secret applies without a restart"))

    @model_validator(mode="after")
    def _one(self) -> "SecretHeaders":
        if (self.env is None) == (self.file is None):
            raise ValueError("headers_from_secret names exactly one of env (a variable) or file (a path)")
        return self


class McpServerConfig(_Section):
    server_label: str = Field(pattern=SERVER_LABEL, description=(
        "The server's name in mcp_call and mcp_list_tools items (as OpenAI's `server_label`)"))
    server_url: str = Field(description="The MCP server's streamable HTTP endpoint, e.g. https://host/mcp")
    allowed_tools: list[str] | None = Field(None, description=(
        "The server's tools the model may call; null: every tool it lists"))
    headers_from_secret: SecretHeaders | None = Field(None, description=(
        "Headers sent with every request to the server (credentials), from a secret; never logged"))
    timeout_s: float = Field(30.0, gt=0, description=(
        "Limit of one tool call (connecting included); past it the model gets a timeout error as the result"))

    @field_validator("server_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value, "server_url")

    @field_validator("server_label")
    @classmethod
    def _label(cls, value: str) -> str:
        if value == WEBHOOK_LABEL:
            raise ValueError(f"server_label {WEBHOOK_LABEL!r} is where webhook calls are reported; "
                             "name the MCP server otherwise")
        return value


class WebhookTool(_Section):
    name: str = Field(pattern=TOOL_NAME, description="The function name the model calls")
    description: str = Field("", description="What the tool does, for the model")
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description=(
        "JSON schema of the arguments; a call whose arguments do not validate is answered with an "
        "error, not sent"))
    url: str = Field(description="Where the arguments are POSTed as JSON; the response body is the tool's output")
    timeout_s: float = Field(30.0, gt=0, description="Limit of one call; past it the model gets a timeout error")
    headers_from_secret: SecretHeaders | None = Field(None, description=(
        "Headers sent with every call (credentials), from a secret; never logged"))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value, "url")

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as error:
            raise ValueError(f"parameters is not a valid JSON schema: {error.message}") from None
        if value.get("type", "object") != "object":
            raise ValueError("parameters must describe an object (\"type\": \"object\"): a call's arguments are one")
        return value


class ToolsSection(_Section):
    mcp_servers: list[McpServerConfig] = Field(default_factory=list, description=(
        "MCP servers (streamable HTTP) whose tools every request may use; the service lists and calls them"))
    webhooks: list[WebhookTool] = Field(default_factory=list, description=(
        "Function tools the service runs by POSTing the arguments to a URL"))
    allowed_mcp_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts ('host' for any port, or 'host:port') of the MCP servers a Responses API request may name "
        "itself ({\"type\": \"mcp\", \"server_url\": ...}); empty: requests may name none (a 400)"))
    max_tool_steps: int = Field(8, ge=1, description=(
        "Rounds of server-side tool calls one request may run; a request whose model still calls one "
        "after the last round ends incomplete (reason max_tool_steps)"))
    list_cache_s: float = Field(300.0, ge=0, description=(
        "How long an MCP server's tool listing is reused before it is fetched again (also refetched "
        "after a failed call)"))

    @model_validator(mode="after")
    def _unique(self) -> "ToolsSection":
        for what, names in (("mcp_servers server_label", [s.server_label for s in self.mcp_servers]),
                            ("webhooks name", [w.name for w in self.webhooks])):
            if duplicated := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"{what} must be unique; {', '.join(duplicated)} appear more than once")
        for host in self.allowed_mcp_hosts:
            if not host or "/" in host or host != host.strip():
                raise ValueError(f"allowed_mcp_hosts entries are 'host' or 'host:port', got {host!r}")
        return self

    @property
    def any(self) -> bool:
        """Whether a request may end up with a server-side tool."""
        return bool(self.mcp_servers or self.webhooks or self.allowed_mcp_hosts)


TENANT_NAME = r"^[A-Za-z0-9][-._A-Za-z0-9]{0,62}$"   # also a file name in $EXPERTMESH_API_KEYS_DIR
KEY_HASH = r"^sha256:[0-9a-f]{64}$"


class TenantLimits(_Section):
    requests_per_minute: int | None = Field(None, ge=1, description=(
        "Requests admitted in any 60-second window, counted across all ingress replicas"))
    tokens_per_minute: int | None = Field(None, ge=1, description=(
        "Prompt plus completion tokens in any 60-second window, across all ingress replicas. A "
        "request is admitted only if its prompt plus max_tokens (for every choice) fits what is "
        "left; when it ends, that reservation is replaced by the tokens it really used."))
    max_concurrent_streams: int | None = Field(None, ge=1, description=(
        "Requests in flight at once (one per request, whatever its n), across all ingress replicas"))
    max_context_tokens: int | None = Field(None, ge=1, description=(
        "Prompt plus max_tokens of one request; more is a 400 like the model's context length "
        "(truncation 'auto' fits a conversation into it)"))


class TenantSpec(_Section):
    api_keys: list[str] = Field(default_factory=list, description=(
        "The tenant's API keys as 'sha256:<64 hex digits>' hashes (make one with `expertmesh "
        "hash-key`), never the keys themselves. More keys come from $EXPERTMESH_API_KEYS_DIR."))
    weight: float = Field(1.0, gt=0, description=(
        "Fair share of each router replica's engine when tenants compete for it: a tenant with "
        "weight 2 is served twice the tokens of one with weight 1"))
    limits: TenantLimits = Field(default_factory=TenantLimits, description=(
        "requests_per_minute, tokens_per_minute, max_concurrent_streams, max_context_tokens; each "
        "optional (unset: no limit)"))
    tools: ToolsSection | None = Field(None, description=(
        "The tenant's server-side tools (MCP servers, webhooks, allowed_mcp_hosts, max_tool_steps); "
        "null: the top-level `tools`"))

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not re.match(KEY_HASH, key):
                raise ValueError(f"api_keys[{i}] is not a key hash: write 'sha256:<64 lowercase hex "
                                 f"digits>' (`expertmesh hash-key` prints it), never the key itself")
        return keys


class ClusterConfig(_Section):
    # A plaintext API key pasted where its hash belongs must not come back in an error or a log:
    # errors name the field and the problem, never the value (pydantic's str() would show it).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field("expertmesh", description="The Serve application's name")
    model: ModelSection = Field(default_factory=ModelSection)
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    ingress: DeploymentSection = Field(default_factory=DeploymentSection)
    router: RouterSection = Field(default_factory=RouterSection)
    http: HttpSection = Field(default_factory=HttpSection)
    grpc: GrpcSection = Field(default_factory=GrpcSection, description=(
        "Serve's gRPC proxy and the public gRPC API on it (used by `expertmesh serve` and the Helm chart)"))
    tenants: dict[str, TenantSpec] = Field(default_factory=dict, description=(
        "Tenant name -> API key hashes, weight and limits. Empty (and no key files in "
        "$EXPERTMESH_API_KEYS_DIR): an open service that needs no key. Otherwise every request "
        "needs the key of a tenant."))
    sessions: SessionsSection = Field(default_factory=SessionsSection)
    tools: ToolsSection = Field(default_factory=ToolsSection, description=(
        "Server-side tools (MCP servers, webhooks) of requests whose tenant has no `tools` of its own, "
        "and of an open service"))

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for name in tenants:
            if not re.match(TENANT_NAME, name):
                raise ValueError(f"tenant name {name!r} must be 1-63 letters, digits, '.', '_' or '-', "
                                 f"starting with a letter or digit")
        return tenants

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.experts.transport == "local" and self.experts.groups != 1:
            raise ValueError("experts.transport 'local' keeps every expert in the router's process: "
                             "use experts.groups 1, or transport 'collective' or 'grpc' for several groups")
        if self.experts.assignment == "balanced" and not self.experts.routing_counts:
            raise ValueError("experts.assignment 'balanced' needs experts.routing_counts (a JSON file of "
                             "measured routing counts)")
        return self

    # -- loading --

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        """Load a YAML file; errors name the file and the offending field."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config sections")
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise ValueError(f"{path}: {describe(error)}") from None

    @classmethod
    def embedded_default(cls) -> "ClusterConfig":
        """What `make run` and `expertmesh serve` without --config serve: smollm2-moe, 2 expert
        groups over the collective transport, HTTP on 127.0.0.1:8000."""
        with resources.as_file(resources.files("cluster") / "defaults" / DEFAULT_CONFIG) as path:
            return cls.from_yaml(path)

    # -- what the engine gets --

    def engine_config(self):
        from router.engine import EngineConfig

        m, x, e = self.model, self.experts, self.engine
        return EngineConfig(
            device=m.device, dtype=m.dtype, max_model_len=m.max_model_len,
            block_size=e.block_size, num_kv_blocks=e.num_kv_blocks, kv_cache_memory_gb=e.kv_cache_memory_gb,
            max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
            enable_prefix_caching=e.enable_prefix_caching,
            expert_groups=x.groups, transport=x.transport, expert_assignment=x.assignment,
            routing_counts=x.routing_counts, placement_strategy=x.placement_strategy, overlap=x.overlap,
            expert_group_timeout_s=x.group_timeout_s, served_model_name=m.served_id,
        )
