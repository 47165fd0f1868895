"""Building blocks shared by the model families: norm, rotary embeddings, attention projections.

Shapes: T = tokens in the step (all sequences flattened), D = hidden size,
H = query heads, K = key/value heads, Hd = head dim.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionContext(Protocol):
    """What a trunk layer needs from the engine: positions and paged attention.

    The engine (router/) implements it; models never see the KV cache layout.
    """

    positions: torch.Tensor  # [T] absolute position of each token in its sequence

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  window: int | None, sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q [T, H, Hd], k/v [T, K, Hd] for the new tokens -> [T, H, Hd]."""
        ...


def cpu_layout(weight: torch.Tensor) -> torch.Tensor:
    """The same [..., out, in] matrices, laid out for the CPU's matrix-vector product.

    `F.linear(x, w)` multiplies by `w.T`. For wide matrices (out > in: gate/up projections,
    the LM head) storing `w.T` contiguous ("column-major") lets MKL read the weight about
    twice as fast as the row-major layout; for narrow ones (down, k/v projections) row-major
    is faster. Measured in docs/BENCHMARKS.md. Values and shapes are unchanged; only strides.
    """
    if weight.shape[-2] <= weight.shape[-1]:
        return weight.contiguous()
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def rope_frequencies(rope: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Hd/2] and the cos/sin scaling for a `rope_parameters` / `rope_scaling` dict.

    Supports `default`, `linear` and `yarn` (YaRN, arXiv:2309.00071, with the
    same correction-range and ramp as the reference implementation).
    """
    base = float(rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, linear, yarn)")

    factor = float(rope["factor"])
    original_max = float(rope.get("original_max_position_embeddings") or max_position_embeddings)
    beta_fast = float(rope.get("beta_fast") or 32.0)
    beta_slow = float(rope.get("beta_slow") or 1.0)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where the frequency is kept as trained, 0 where it is interpolated
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """Rotates the two halves of each head (the "rotate_half" convention all three families use)."""

    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        inv_freq, self.scaling = rope_frequencies(rope, head_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]         # [T, Hd/2]
        return (freqs.cos() * self.scaling).to(dtype), (freqs.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Hd], cos/sin [T, Hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    """Projections, optional per-head q/k norm, rotary, then the engine's paged attention.

    Attribute names equal the checkpoint's (`q_proj`, `k_norm`, `sinks`, ...).
    """

    def __init__(self, layer: int, hidden: int, heads: int, kv_heads: int, head_dim: int, *,
                 bias: bool, qk_norm_eps: float | None = None, sinks: bool = False,
                 window: int | None = None):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        self.window = window
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.heads, self.head_dim)                # [T, H, Hd]
        k = self.k_proj(x).view(T, self.kv_heads, self.head_dim)             # [T, K, Hd]
        v = self.v_proj(x).view(T, self.kv_heads, self.head_dim)             # [T, K, Hd]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = ctx.attention(self.layer, q, k, v, window=self.window, sinks=self.sinks, scale=self.scale)
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))      # [T, D]


class SwiGLU(nn.Module):
    """The dense MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
