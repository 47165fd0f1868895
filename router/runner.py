"""One forward pass of the trunk over a scheduled batch."""
from __future__ import annotations

import torch

from models.base import Trunk
from router.attention import PagedAttention, PrefillChunk
from router.kv_cache import KVCache
from router.scheduler import ScheduledSeq
from router.transport import Transport


class ModelRunner:
    def __init__(self, trunk: Trunk, transport: Transport, kv: KVCache, device: torch.device, *,
                 overlap: bool = False):
        self.trunk = trunk
        self.transport = transport
        self.kv = kv
        self.device = device
        self.overlap = overlap
        config = trunk.config
        self.routing_counts = torch.zeros((len(config.moe_layers), config.num_experts), dtype=torch.long,
                                          device=device)
        self._moe_row = {layer: row for row, layer in enumerate(config.moe_layers)}

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], *, all_logits: bool = False) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Run the step; returns logits [S, V] for the sequences that sample, in that order
        (with `all_logits`, logits [T, V] of every token in the step's order instead)."""
        batch = sorted(batch, key=lambda item: item.num_tokens != 1 or not item.samples)  # decodes first
        if self.overlap and not all_logits and len(batch) >= 2 and all(
                item.num_tokens == 1 and item.samples for item in batch):
            half = len(batch) // 2
            return self._execute_overlapped([batch[:half], batch[half:]]), batch
        ctx, input_ids, sample_rows = self._prepare(batch)
        trunk = self.trunk
        h = trunk.embed(input_ids)                                              # [T, D]
        rotary = trunk.rotary(ctx.positions, h.dtype)
        for layer in trunk.layers:
            h = layer.attention(h, rotary, ctx)
            x = layer.ffn_input(h)
            if layer.is_moe:
                ids, weights = self._route(layer, x)                            # [T, A], [T, A]
                h = h + self.transport.dispatch(layer.index, x, ids, weights)
            else:
                h = h + layer.dense_mlp(x)
        if all_logits:
            return trunk.logits(h), batch
        logits = trunk.logits(h[sample_rows])                                   # [S, V]
        return logits, [item for item in batch if item.samples]

    def _execute_overlapped(self, micro_batches: list[list[ScheduledSeq]]) -> torch.Tensor:
        """Decode in two micro-batches, ping-pong (MegaScale-Infer): while one micro-batch's
        tokens are with the expert groups, the other's attention runs here."""
        trunk = self.trunk
        state = []
        for mb in micro_batches:
            ctx, input_ids, _ = self._prepare(mb)
            h = trunk.embed(input_ids)                                          # [t, D]
            state.append([ctx, trunk.rotary(ctx.positions, h.dtype), h, None])  # ctx, rotary, h, pending
        for layer in trunk.layers:
            for s in state:
                ctx, rotary, h, pending = s
                if pending is not None:
                    h = h + pending.wait()                                      # previous layer's experts
                h = layer.attention(h, rotary, ctx)
                x = layer.ffn_input(h)
                if layer.is_moe:
                    ids, weights = self._route(layer, x)
                    s[3] = self.transport.dispatch_async(layer.index, x, ids, weights)
                else:
                    h, s[3] = h + layer.dense_mlp(x), None
                s[2] = h
        hidden = [h if pending is None else h + pending.wait() for _, _, h, pending in state]
        return trunk.logits(torch.cat(hidden))                                  # every row samples

    def _route(self, layer, x: torch.Tensor):
        ids, weights = layer.route(x)                                           # [T, A], [T, A]
        self.routing_counts[self._moe_row[layer.index]] += torch.bincount(
            ids.flatten(), minlength=self.routing_counts.shape[1])
        return ids, weights

    def _prepare(self, batch: list[ScheduledSeq]):
        block_size = self.kv.block_size
        input_ids, positions, slots, sample_rows = [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            row = len(input_ids)
            end = start + item.num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end))
            if item.num_tokens == 1 and item.samples:
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                table = torch.tensor(seq.block_table[:-(-end // block_size)], dtype=torch.long)
                prefills.append(PrefillChunk(row, item.num_tokens, start, table.to(self.device)))
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]  # padding points at block 0, masked out
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)
        ctx = PagedAttention(
            self.kv,
            positions=as_long(positions),
            slot_mapping=as_long(slots),
            decode_block_tables=as_long(padded).view(len(padded), width),
            decode_context_lens=as_long(decode_lens),
            prefills=prefills,
        )
        return ctx, as_long(input_ids), as_long(sample_rows)
