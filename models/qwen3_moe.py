"""Qwen3-MoE: per-head q/k RMSNorm, softmax router then top-k (renormalized when
`norm_topk_prob`), MoE every `decoder_sparse_step` layers except `mlp_only_layers`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (DecoderLayer, ModelConfig, Trunk, eos_ids, require, rope_parameters)
from models.checkpoint import CheckpointReader
from models.layers import RMSNorm, SelfAttention, SwiGLU

MODEL_TYPE = "qwen3_moe"


def parse_config(raw: dict) -> ModelConfig:
    hidden = require(raw, "hidden_size", MODEL_TYPE)
    heads = require(raw, "num_attention_heads", MODEL_TYPE)
    layers = require(raw, "num_hidden_layers", MODEL_TYPE)
    # Published checkpoints say `num_experts`; transformers 5 writes `num_local_experts`.
    num_experts = raw.get("num_experts") or require(raw, "num_local_experts", MODEL_TYPE)
    step = raw.get("decoder_sparse_step", 1) or 1
    dense_only = set(raw.get("mlp_only_layers") or [])
    moe_layers = tuple(i for i in range(layers)
                       if i not in dense_only and num_experts > 0 and (i + 1) % step == 0)
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    return ModelConfig(
        model_type=MODEL_TYPE,
        vocab_size=require(raw, "vocab_size", MODEL_TYPE),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rope=rope_parameters(raw),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        num_experts=num_experts,
        top_k=require(raw, "num_experts_per_tok", MODEL_TYPE),
        expert_intermediate_size=require(raw, "moe_intermediate_size", MODEL_TYPE),
        moe_layers=moe_layers,
        layer_windows=(window,) * layers,
        eos_token_ids=eos_ids(raw),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        extra={"norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
               "intermediate_size": raw.get("intermediate_size")},
    )


def gate(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> ids [T, A], weights [T, A]: softmax, top-k, optionally renormalize."""
    probs = F.softmax(router_logits.float(), dim=-1)                           # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                            # [T, A]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def expert_activation(config: ModelConfig):
    return lambda gate_out, up_out: F.silu(gate_out) * up_out


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)


class Qwen3MoeLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index, self.top_k = index, config.top_k
        self.norm_topk_prob = config.extra["norm_topk_prob"]
        self.is_moe = index in config.moe_layers
        self.self_attn = SelfAttention(index, config.hidden_size, config.num_heads, config.num_kv_heads,
                                       config.head_dim, bias=False, qk_norm_eps=config.rms_norm_eps,
                                       window=config.layer_windows[index])
        if self.is_moe:
            self.mlp = SparseMoE(config.hidden_size, config.num_experts)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.extra["intermediate_size"])
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def route(self, x):
        return gate(self.mlp.gate(x), self.top_k, self.norm_topk_prob)

    def dense_mlp(self, x):
        return self.mlp(x)


def build_trunk(config: ModelConfig) -> Trunk:
    return Trunk(config, [Qwen3MoeLayer(config, i) for i in range(config.num_layers)])


def load_expert(reader: CheckpointReader, config: ModelConfig, layer: int, expert: int):
    """-> gate_up [2I, D], down [D, I], no biases."""
    D, I = config.hidden_size, config.expert_intermediate_size
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    gate_w = reader.get(f"{prefix}.gate_proj.weight", shape=(I, D))
    up_w = reader.get(f"{prefix}.up_proj.weight", shape=(I, D))
    down_w = reader.get(f"{prefix}.down_proj.weight", shape=(D, I))
    return torch.cat([gate_w, up_w]), down_w, None, None
