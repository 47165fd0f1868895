"""MXFP4 (OCP microscaling FP4) expert weights, as published gpt-oss checkpoints store them.

`*_blocks` [..., G, 16] uint8 hold two E2M1 values per byte (low nibble
first) for groups of 32 values along the input dimension; `*_scales`
[..., G] uint8 hold one power-of-two exponent per group, biased by 127.
"""
from __future__ import annotations

import torch

# E2M1 code -> value; the high bit is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP_SIZE = 32


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP_SIZE // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    lo = lut[(blocks & 0x0F).long()]                                     # [..., G, 16]
    hi = lut[(blocks >> 4).long()]                                       # [..., G, 16]
    values = torch.stack((lo, hi), dim=-1).flatten(-2)                   # [..., G, 32]
    exponents = scales.to(torch.int32) - 127                             # [..., G]
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)                                  # [..., G * 32]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).

    Round-to-nearest onto the E2M1 grid with a shared power-of-two scale per
    group of 32, chosen so the group's largest magnitude fits under 6.0.
    """
    if weight.shape[-1] % GROUP_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {GROUP_SIZE}, got {weight.shape[-1]}")
    w = weight.float().reshape(*weight.shape[:-1], -1, GROUP_SIZE)      # [..., G, 32]
    amax = w.abs().amax(dim=-1).clamp(min=2.0 ** -126)                   # [..., G]
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)       # smallest scale with amax/scale <= 6
    scaled = w / torch.exp2(exponent).unsqueeze(-1)
    grid = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(dim=-1)     # [..., G, 32] nearest magnitude
    codes = codes | ((scaled < 0).long() << 3)
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)                  # [..., G, 16]
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
