"""Paged KV cache: fixed-size blocks, per-sequence block tables, a free list,
and prefix caching by hashing full blocks.

A full block's hash chains the previous block's hash with its token ids, so
equal hashes mean equal prefixes. A block whose last user finishes keeps its
hash and contents while it sits in the free list; a later request with the
same prefix takes it back instead of recomputing. Free blocks are reused
least recently freed first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from router.sequence import Sequence


class KVCache:
    """Keys and values of every layer: [layers, blocks, block_size, kv_heads, head_dim] each."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PrefixCacheStats:
    queries: int = 0   # prompt tokens looked up
    hits: int = 0      # prompt tokens found in the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`'s tokens. At least one token is
        always left to compute, since its logits are what the step is for."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = self._hash(parent, tokens)
            block = self.hash_to_block.get(parent)
            if block is None or self.block_tokens[block] != tokens:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        """Whether `seq`'s table can grow to cover `num_tokens` tokens."""
        reused_free = sum(1 for b in prefix_blocks if self.ref_count[b] == 0)
        fresh = self.blocks_needed(num_tokens) - len(seq.block_table) - len(prefix_blocks)
        return max(fresh, 0) + reused_free <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int, prefix_blocks: list[int] = ()) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens, taking `prefix_blocks`
        (from `match_prefix`, only on admission) first. Call `can_allocate` before."""
        if prefix_blocks:
            assert not seq.block_table, "prefix blocks are only taken on admission"
            for block in prefix_blocks:
                if self.ref_count[block] == 0:
                    del self.free[block]
                self.ref_count[block] += 1
            seq.block_table = list(prefix_blocks)
            seq.num_hashed_blocks = len(prefix_blocks)
            seq.num_computed_tokens = len(prefix_blocks) * self.block_size
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            block, _ = self.free.popitem(last=False)
            if self.block_hash[block] is not None:
                if self.hash_to_block.get(self.block_hash[block]) == block:
                    del self.hash_to_block[self.block_hash[block]]
                self.block_hash[block] = self.block_tokens[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def record_prefix_lookup(self, seq: Sequence, hit_blocks: int) -> None:
        self.stats.queries += seq.num_tokens
        self.stats.hits += hit_blocks * self.block_size
        seq.num_cached_tokens = hit_blocks * self.block_size

    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full of computed tokens, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        parent = self.block_hash[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = self._hash(parent, tokens)
            if self.block_hash[block] is None:
                self.block_hash[block], self.block_tokens[block] = parent, tokens
                # The first block to hold a prefix keeps the entry; a twin computed concurrently stays private.
                self.hash_to_block.setdefault(parent, block)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free_sequence(self, seq: Sequence) -> None:
        # Last blocks first, so a sequence's tail is evicted before its (more shareable) head.
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
