"""What every model family provides, and the trunk they share.

A family module (gpt_oss, qwen3_moe, mixtral) turns a checkpoint's
`config.json` into a `ModelConfig`, builds its decoder layers, says how its
gate picks experts, how its experts activate, and where their tensors live.
The engine (router/) runs the trunk; the expert side (experts/) runs the experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from models.checkpoint import CheckpointError, CheckpointReader
from models.layers import AttentionContext, RMSNorm, RotaryEmbedding, cpu_layout


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    moe_layers: tuple[int, ...]              # indices of layers whose FFN is a mixture of experts
    layer_windows: tuple[int | None, ...]    # sliding window per layer, None = full attention
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict)  # family-specific fields (swiglu alpha, norm_topk_prob, ...)

    @property
    def max_window(self) -> int | None:
        """The largest window any layer uses, None if some layer attends to the whole context."""
        return None if any(w is None for w in self.layer_windows) else max(self.layer_windows)


def require(raw: dict, key: str, model_type: str):
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"config.json of a {model_type} checkpoint lacks the field {key!r}")
    return raw[key]


def rope_parameters(raw: dict) -> dict:
    """The rope dict from either the new `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope.setdefault("rope_theta", raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope.setdefault("rope_type", rope.get("type", "default"))
    if "original_max_position_embeddings" in raw:
        rope.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
    return rope


def eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass
class ExpertWeights:
    """The weights of some experts of one MoE layer, in one layout for every family.

    gate_up [E, 2I, D] holds the gate rows then the up rows (de-interleaved
    on load where a checkpoint interleaves them); down [E, D, I].
    """
    expert_ids: list[int]
    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None   # [E, 2I]
    down_bias: torch.Tensor | None = None      # [E, D]


ExpertActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate, up) -> hidden


class DecoderLayer(nn.Module):
    """A family's decoder layer: `h = h + attn(norm(h))`, then the FFN input `norm(h)`.

    Subclasses set `self_attn`, the two norms, `is_moe`, and implement
    `route` (MoE layers) or `dense_mlp` (dense layers).
    """
    is_moe: bool

    def attention(self, h: torch.Tensor, rotary, ctx: AttentionContext) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), rotary, ctx)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(h)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert ids [T, A] (int64), routing weights [T, A] (float32)."""
        raise TypeError(f"layer {self.index} has no experts")

    def dense_mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"layer {self.index} is a mixture of experts")


class Trunk(nn.Module):
    """Embedding, decoder layers (attention, norms, gates, dense MLPs), final norm, LM head.

    Parameter names equal the checkpoint's keys, so loading is a loop over
    `state_dict()`. Expert weights are not here: experts/ loads them.
    """

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self._lm_head_weight: torch.Tensor | None = None   # set by load() for tied embeddings

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)                            # [T, D]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        weight = self._lm_head_weight if self._lm_head_weight is not None else self.lm_head.weight
        return torch.nn.functional.linear(h, weight).float()                 # [T, V]

    def load(self, reader: CheckpointReader, dtype: torch.dtype, device: torch.device) -> None:
        with torch.no_grad():
            for name, param in self.state_dict().items():
                tensor = reader.get(name, shape=tuple(param.shape))
                param.copy_(tensor.to(param.dtype))
        self.to(device=device, dtype=dtype)
        if device.type == "cpu":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.data = cpu_layout(module.weight.data)
        # A tied LM head reads the embedding table; on the CPU it gets its own (wide) layout,
        # since the embedding lookup wants rows contiguous.
        self._lm_head_weight = None
        if self.config.tie_word_embeddings:
            embedding = self.model.embed_tokens.weight.data
            self._lm_head_weight = cpu_layout(embedding) if device.type == "cpu" else embedding
        self.rotary.inv_freq = self.rotary.inv_freq.float()  # frequencies stay in fp32 whatever the dtype
