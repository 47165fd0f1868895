"""gpt-oss: alternating sliding-window / full attention with learned sinks and
biased projections, YaRN rotary, a biased linear router (top-k, then softmax
over the selected logits) and clamped SwiGLU experts, stored in MXFP4 in the
published checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import mxfp4
from models.base import DecoderLayer, ModelConfig, Trunk, eos_ids, require, rope_parameters
from models.checkpoint import CheckpointError, CheckpointReader
from models.layers import RMSNorm, SelfAttention

MODEL_TYPE = "gpt_oss"


def parse_config(raw: dict) -> ModelConfig:
    hidden = require(raw, "hidden_size", MODEL_TYPE)
    heads = require(raw, "num_attention_heads", MODEL_TYPE)
    layers = require(raw, "num_hidden_layers", MODEL_TYPE)
    # Without `layer_types`, gpt-oss alternates: even layers slide, odd layers see everything.
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if len(layer_types) != layers:
        raise CheckpointError(f"config.json: layer_types has {len(layer_types)} entries for {layers} layers")
    window = raw.get("sliding_window")
    windows = []
    for i, kind in enumerate(layer_types):
        if kind == "sliding_attention":
            if not window:
                raise CheckpointError(f"config.json: layer {i} is sliding_attention but sliding_window is {window!r}")
            windows.append(int(window))
        elif kind == "full_attention":
            windows.append(None)
        else:
            raise CheckpointError(f"config.json: layer_types[{i}] = {kind!r} is not sliding_attention or full_attention")
    return ModelConfig(
        model_type=MODEL_TYPE,
        vocab_size=require(raw, "vocab_size", MODEL_TYPE),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        max_position_embeddings=raw.get("max_position_embeddings", 131072),
        rope=rope_parameters(raw),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        num_experts=require(raw, "num_local_experts", MODEL_TYPE),
        top_k=require(raw, "num_experts_per_tok", MODEL_TYPE),
        expert_intermediate_size=require(raw, "intermediate_size", MODEL_TYPE),
        moe_layers=tuple(range(layers)),
        layer_windows=tuple(windows),
        eos_token_ids=eos_ids(raw),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        extra={"attention_bias": raw.get("attention_bias", True),
               "swiglu_alpha": float(raw.get("swiglu_alpha", 1.702)),
               "swiglu_limit": float(raw.get("swiglu_limit", 7.0))},
    )


def gate(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> ids [T, A], weights [T, A]: top-k first, softmax over the k chosen."""
    top_logits, ids = torch.topk(router_logits, top_k, dim=-1)                 # [T, A]
    return ids, F.softmax(top_logits.float(), dim=-1)


def expert_activation(config: ModelConfig):
    alpha, limit = config.extra["swiglu_alpha"], config.extra["swiglu_limit"]

    def clamped_swiglu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        gate_out = gate_out.clamp(max=limit)
        up_out = up_out.clamp(min=-limit, max=limit)
        return (up_out + 1) * (gate_out * torch.sigmoid(gate_out * alpha))

    return clamped_swiglu


class MLPRouter(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=True)


class GptOssLayer(DecoderLayer):
    is_moe = True

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index, self.top_k = index, config.top_k
        self.self_attn = SelfAttention(index, config.hidden_size, config.num_heads, config.num_kv_heads,
                                       config.head_dim, bias=config.extra["attention_bias"], sinks=True,
                                       window=config.layer_windows[index])
        self.mlp = MLPRouter(config.hidden_size, config.num_experts)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def route(self, x):
        return gate(self.mlp.router(x), self.top_k)


def build_trunk(config: ModelConfig) -> Trunk:
    return Trunk(config, [GptOssLayer(config, i) for i in range(config.num_layers)])


def _expert_matrix(reader: CheckpointReader, prefix: str, expert: int, out_features: int,
                   in_features: int, num_experts: int) -> torch.Tensor:
    """One expert's weight as [out, in], from MXFP4 blocks/scales or a plain [E, in, out] tensor."""
    if reader.has(f"{prefix}_blocks"):
        groups = in_features // mxfp4.GROUP_SIZE
        blocks = reader.get(f"{prefix}_blocks", shape=(num_experts, out_features, groups, 16), index=expert)
        scales = reader.get(f"{prefix}_scales", shape=(num_experts, out_features, groups), index=expert)
        return mxfp4.dequantize(blocks, scales)                                # [out, in]
    return reader.get(prefix, shape=(num_experts, in_features, out_features), index=expert).t()


def load_expert(reader: CheckpointReader, config: ModelConfig, layer: int, expert: int):
    """-> gate_up [2I, D] (gate rows, then up rows), down [D, I], and their biases."""
    D, I, E = config.hidden_size, config.expert_intermediate_size, config.num_experts
    prefix = f"model.layers.{layer}.mlp.experts"
    gate_up = _expert_matrix(reader, f"{prefix}.gate_up_proj", expert, 2 * I, D, E)   # [2I, D] interleaved
    down = _expert_matrix(reader, f"{prefix}.down_proj", expert, D, I, E)              # [D, I]
    gate_up_bias = reader.get(f"{prefix}.gate_up_proj_bias", shape=(E, 2 * I), index=expert)
    down_bias = reader.get(f"{prefix}.down_proj_bias", shape=(E, D), index=expert)
    # The checkpoint interleaves gate and up rows (g0, u0, g1, u1, ...); split them once here.
    gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
    gate_up_bias = torch.cat([gate_up_bias[0::2], gate_up_bias[1::2]])
    return gate_up, down, gate_up_bias, down_bias
