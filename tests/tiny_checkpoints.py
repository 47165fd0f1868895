"""Tiny random checkpoints, written by transformers' own model classes.

Nothing is downloaded: each function builds a model from a config, saves it
with `save_pretrained`, and returns (directory, the transformers model) so a
test can compare the engine with the reference that wrote the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256


def _common(**overrides) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.2, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
                pad_token_id=None)
    base.update(overrides)
    return base


def _save(model, path: Path):
    model.eval()
    model.generation_config.pad_token_id = None
    model.save_pretrained(path)
    return path, model


def mixtral(path: Path, *, seed: int = 0, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    settings = dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None, rope_theta=10000.0)
    settings.update(overrides)
    config = MixtralConfig(**_common(**settings))
    return _save(MixtralForCausalLM(config), path)


def qwen3_moe(path: Path, *, seed: int = 0, **overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    settings = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, head_dim=16,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])
    settings.update(overrides)
    config = Qwen3MoeConfig(**_common(**settings))
    return _save(Qwen3MoeForCausalLM(config), path)


def gpt_oss(path: Path, *, seed: int = 0, **overrides):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    settings = dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                    intermediate_size=64, num_hidden_layers=4,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0,
                                     "original_max_position_embeddings": 64, "truncate": False})
    settings.update(overrides)
    config = GptOssConfig(**_common(**settings))
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # random sinks and biases, so the test exercises them (init leaves them at zero)
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1.0)
            layer.mlp.router.bias.normal_(0, 0.5)
            layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.2)
            layer.mlp.experts.down_proj_bias.normal_(0, 0.2)
    return _save(model, path)


FAMILIES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}
