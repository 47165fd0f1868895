"""The one typed config of an expertmesh cluster.

A YAML file (`expertmesh serve --config FILE`), the `args` of a Serve config
(`import_path: deployments.app:build_app`) and, later, the Helm values all map
onto `ClusterConfig`. Every field has a description; unknown fields are errors.

    model:       which checkpoint, the id clients ask for, device, dtype, context length
    experts:     expert groups, transport, assignment and placement (EngineConfig's expert fields)
    engine:      KV cache, batching limits and the router's bounded queue
    ingress:     Serve options of the OpenAI HTTP deployment (replicas, autoscaling, resources)
    router:      Serve options of the router deployment (one engine per replica), session affinity
    http:        where Serve's HTTP proxy listens (used by `expertmesh serve`)
    sessions:    the Responses API's store (SQLite, PostgreSQL) and long-conversation policy

Tenants and session stores get their sections with the issue that implements them.
"""
from __future__ import annotations

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


class ClusterConfig(_Section):
    name: str = Field("expertmesh", description="The Serve application's name")
    model: ModelSection = Field(default_factory=ModelSection)
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    ingress: DeploymentSection = Field(default_factory=DeploymentSection)
    router: RouterSection = Field(default_factory=RouterSection)
    http: HttpSection = Field(default_factory=HttpSection)
    sessions: SessionsSection = Field(default_factory=SessionsSection)

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
