"""Attention over the paged KV cache for one engine step.

The step's tokens are flattened: first one token for each decoding
sequence, then the chunk of each prefilling sequence. Decodes run as one
batched attention over their gathered blocks; each prefill chunk runs on its
own (a few per step). Legend: B = decoding sequences, S = gathered context
positions, H = query heads, K = kv heads, G = H / K, Hd = head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from router.kv_cache import KVCache


@dataclass
class PrefillChunk:
    start: int                  # first row of this chunk in the step's tokens
    num_tokens: int
    first_position: int         # position of the chunk's first token in its sequence
    block_table: torch.Tensor   # [blocks] covering first_position + num_tokens


class PagedAttention:
    def __init__(self, kv: KVCache, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 decode_block_tables: torch.Tensor, decode_context_lens: torch.Tensor,
                 prefills: list[PrefillChunk]):
        self.kv = kv
        self.positions = positions                      # [T]
        self.slot_mapping = slot_mapping                # [T] block * block_size + offset
        self.decode_block_tables = decode_block_tables  # [B, max_blocks]
        self.decode_context_lens = decode_context_lens  # [B] including the new token
        self.num_decodes = decode_block_tables.shape[0]
        self.prefills = prefills

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  window: int | None, sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]             # [N, bs, K, Hd]
        heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, heads, head_dim).index_copy_(0, self.slot_mapping, k)
        v_cache.view(-1, heads, head_dim).index_copy_(0, self.slot_mapping, v)

        out = torch.empty_like(q)                                          # [T, H, Hd]
        if self.num_decodes:
            out[:self.num_decodes] = self._decode(q[:self.num_decodes], k_cache, v_cache, window, sinks, scale)
        for chunk in self.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.first_position == 0:
                keys, values = k[rows], v[rows]       # nothing earlier in the cache: use the fresh tensors
            else:
                context = chunk.first_position + chunk.num_tokens
                keys = k_cache[chunk.block_table].flatten(0, 1)[:context]    # [S, K, Hd]
                values = v_cache[chunk.block_table].flatten(0, 1)[:context]
            q_pos = torch.arange(chunk.num_tokens, device=q.device) + chunk.first_position
            k_pos = torch.arange(keys.shape[0], device=q.device)
            allowed = k_pos[None, :] <= q_pos[:, None]                      # [n, S] causal
            if window is not None:
                allowed &= q_pos[:, None] - k_pos[None, :] < window
            out[rows] = attend(q[rows].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                               allowed.unsqueeze(0), sinks, scale)[0]
        return out

    def _decode(self, q, k_cache, v_cache, window, sinks, scale):
        tables, lens = self.decode_block_tables, self.decode_context_lens   # [B, M], [B]
        block_size = k_cache.shape[1]
        if window is not None and window < tables.shape[1] * block_size:
            # Gather only the blocks the window can reach: W per sequence, starting at its first visible block.
            width = -(-window // block_size) + 1
            first = ((lens - window).clamp(min=0) // block_size).clamp(max=max(tables.shape[1] - width, 0))
            cols = (first[:, None] + torch.arange(width, device=q.device)).clamp(max=tables.shape[1] - 1)
            tables = torch.gather(tables, 1, cols)                          # [B, W]
            offset = first * block_size
        else:
            offset = torch.zeros_like(lens)
        B, M = tables.shape
        keys = k_cache.index_select(0, tables.flatten()).view(B, M * block_size, *k_cache.shape[2:])    # [B, S, K, Hd]
        values = v_cache.index_select(0, tables.flatten()).view(B, M * block_size, *v_cache.shape[2:])
        k_pos = offset[:, None] + torch.arange(M * block_size, device=q.device)                         # [B, S]
        q_pos = (lens - 1)[:, None]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= q_pos - k_pos < window
        return attend(q.unsqueeze(1), keys, values, allowed.unsqueeze(1), sinks, scale).squeeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, n, H, Hd], k/v [B, S, K, Hd], allowed [B, n, S] -> [B, n, H, Hd].

    With `sinks`, each head has a learned logit that joins the softmax's
    denominator and is then dropped (gpt-oss), so a head may attend to nothing.
    """
    if sinks is None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=allowed.unsqueeze(1), scale=scale, enable_gqa=True)   # [B, H, n, Hd]
        return out.transpose(1, 2)
    B, n, H, Hd = q.shape
    K = k.shape[2]
    G = H // K
    qg = q.view(B, n, K, G, Hd).permute(0, 2, 3, 1, 4)                      # [B, K, G, n, Hd]
    scores = qg @ k.permute(0, 2, 3, 1).unsqueeze(2) * scale                # [B, K, G, n, S]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    sink = sinks.view(1, K, G, 1, 1).to(scores.dtype).expand(B, K, G, n, 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    out = probs.to(v.dtype) @ v.permute(0, 2, 1, 3).unsqueeze(2)            # [B, K, G, n, Hd]
    return out.permute(0, 3, 1, 2, 4).reshape(B, n, H, Hd)
