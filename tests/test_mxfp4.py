"""MXFP4 expert weights: our dequantization equals transformers' own conversion,
and a gpt-oss checkpoint stored in MXFP4 (as the published ones are) generates
what transformers generates from the same quantized weights."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from models import mxfp4
from router.sampling import SamplingParams
from tests import tiny_checkpoints
from tests.test_models import engine_for, prompts, reference_greedy


def test_dequantize_equals_transformers_conversion():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)    # [E, out, G, 16]
    scales = torch.randint(110, 140, (3, 10, 4), dtype=torch.uint8, generator=g)      # [E, out, G]
    ours = mxfp4.dequantize(blocks, scales)                                           # [E, out, in]
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)       # [E, in, out]
    torch.testing.assert_close(ours, reference.transpose(1, 2), atol=0, rtol=0)


def test_quantize_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 128, generator=g)
    restored = mxfp4.dequantize(*mxfp4.quantize(w))
    # E2M1 keeps about one significant bit: the error is bounded by half a step at the group's scale.
    assert (restored - w).abs().max() <= w.abs().max() / 6 * 1.01
    # Values already on the grid survive exactly.
    exact = mxfp4.dequantize(*mxfp4.quantize(restored))
    torch.testing.assert_close(exact, restored, atol=0, rtol=0)


def _quantize_checkpoint(path):
    """Replace the dense expert tensors by *_blocks / *_scales, as the published checkpoints store them."""
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weight = tensors.pop(name).transpose(1, 2).contiguous()                       # [E, out, in]
        blocks, scales = mxfp4.quantize(weight)
        tensors[f"{name}_blocks"] = blocks.reshape(*scales.shape, 16)
        tensors[f"{name}_scales"] = scales
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_mxfp4_checkpoint_generates_like_transformers(tmp_path):
    path, model = tiny_checkpoints.gpt_oss(tmp_path / "gpt_oss_mxfp4", seed=2)
    tensors = _quantize_checkpoint(path)
    # The reference: transformers' model with its experts set to transformers' dequantization.
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                prefix = f"model.layers.{i}.mlp.experts.{proj}"
                dense = convert_moe_packed_tensors(tensors[f"{prefix}_blocks"], tensors[f"{prefix}_scales"],
                                                   dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(dense)
    engine = engine_for(path)
    prompt = prompts([21], seed=4)[0]
    with torch.no_grad():
        reference_logits = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(engine.prompt_logits(prompt), reference_logits, atol=1e-4, rtol=1e-4)
    [result] = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert result.token_ids == reference_greedy(model, prompt)
