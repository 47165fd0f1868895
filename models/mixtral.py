"""Mixtral: softmax over all experts, top-k, renormalized; SwiGLU experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (DecoderLayer, ExpertWeights, ModelConfig, Trunk, eos_ids, require,
                         rope_parameters)
from models.checkpoint import CheckpointReader
from models.layers import RMSNorm, SelfAttention

MODEL_TYPE = "mixtral"


def parse_config(raw: dict) -> ModelConfig:
    hidden = require(raw, "hidden_size", MODEL_TYPE)
    heads = require(raw, "num_attention_heads", MODEL_TYPE)
    layers = require(raw, "num_hidden_layers", MODEL_TYPE)
    return ModelConfig(
        model_type=MODEL_TYPE,
        vocab_size=require(raw, "vocab_size", MODEL_TYPE),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rope=rope_parameters(raw),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        num_experts=require(raw, "num_local_experts", MODEL_TYPE),
        top_k=require(raw, "num_experts_per_tok", MODEL_TYPE),
        expert_intermediate_size=require(raw, "intermediate_size", MODEL_TYPE),
        moe_layers=tuple(range(layers)),
        layer_windows=(raw.get("sliding_window"),) * layers,
        eos_token_ids=eos_ids(raw),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )


def gate(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> ids [T, A], weights [T, A]: softmax, top-k, renormalize."""
    probs = F.softmax(router_logits.float(), dim=-1)                           # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                            # [T, A]
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def expert_activation(config: ModelConfig):
    return lambda gate_out, up_out: F.silu(gate_out) * up_out


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)


class MixtralLayer(DecoderLayer):
    is_moe = True

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index, self.top_k = index, config.top_k
        self.self_attn = SelfAttention(index, config.hidden_size, config.num_heads, config.num_kv_heads,
                                       config.head_dim, bias=False, window=config.layer_windows[index])
        self.block_sparse_moe = Router(config.hidden_size, config.num_experts)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def route(self, x):
        return gate(self.block_sparse_moe.gate(x), self.top_k)


def build_trunk(config: ModelConfig) -> Trunk:
    return Trunk(config, [MixtralLayer(config, i) for i in range(config.num_layers)])


def load_expert(reader: CheckpointReader, config: ModelConfig, layer: int, expert: int):
    """-> gate_up [2I, D], down [D, I], no biases."""
    D, I = config.hidden_size, config.expert_intermediate_size
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    w1 = reader.get(f"{prefix}.w1.weight", shape=(I, D))  # gate
    w3 = reader.get(f"{prefix}.w3.weight", shape=(I, D))  # up
    w2 = reader.get(f"{prefix}.w2.weight", shape=(D, I))  # down
    return torch.cat([w1, w3]), w2, None, None
