"""Batched expert FFNs for a slice of the experts of every MoE layer.

Legend: T = tokens, A = active experts per token, D = hidden, I = expert
intermediate size, E = experts held here.

All tokens routed to one expert in a step go through one matmul: the (token,
slot) pairs are sorted by expert id and each expert runs on its contiguous
run. No weight is ever gathered per token.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Iterable

import torch

from models.base import ExpertActivation, ExpertWeights, ModelConfig
from models.checkpoint import CheckpointReader
from models.layers import cpu_layout


class ExpertBank:
    def __init__(self, config: ModelConfig, activation: ExpertActivation,
                 layers: dict[int, ExpertWeights]):
        self.config = config
        self.activation = activation
        self.layers = layers
        # global expert id -> local row, per layer (-1: not held here)
        self._local_index = {}
        for layer, weights in layers.items():
            index = torch.full((config.num_experts,), -1, dtype=torch.long)
            index[torch.tensor(weights.expert_ids, dtype=torch.long)] = torch.arange(len(weights.expert_ids))
            self._local_index[layer] = index

    @classmethod
    def load(cls, family: ModuleType, config: ModelConfig, model_dir: str | Path,
             experts: Iterable[int] | None = None, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> "ExpertBank":
        """Read only the tensors of `experts` (all when None) of every MoE layer."""
        expert_ids = sorted(experts) if experts is not None else list(range(config.num_experts))
        reader = CheckpointReader(model_dir)
        layers = {}
        for layer in config.moe_layers:
            parts = [family.load_expert(reader, config, layer, e) for e in expert_ids]
            gate_up, down, gate_up_bias, down_bias = zip(*parts)
            stack = lambda ts: None if ts[0] is None else torch.stack(ts).to(device=device, dtype=dtype)
            matrices = (lambda ts: cpu_layout(stack(ts))) if torch.device(device).type == "cpu" else stack
            layers[layer] = ExpertWeights(expert_ids, matrices(gate_up), matrices(down), stack(gate_up_bias),
                                          stack(down_bias))
        return cls(config, family.expert_activation(config), layers)

    @property
    def expert_ids(self) -> list[int]:
        return next(iter(self.layers.values())).expert_ids if self.layers else []

    def nbytes_per_expert(self) -> int:
        weights = next(iter(self.layers.values()))
        per_layer = sum(t[0].numel() * t.element_size() for t in
                        (weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias) if t is not None)
        return per_layer * len(self.layers)

    @torch.no_grad()
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, A] (global ids), weights [T, A] -> sum over the held experts [T, D].

        Slots routed to experts held elsewhere contribute nothing here.
        """
        w = self.layers[layer]
        if x.shape[0] == 1:
            return self._forward_one_token(w, layer, x, expert_ids, weights)
        out = torch.zeros_like(x)
        local = self._local_index[layer].to(expert_ids.device)[expert_ids]    # [T, A]
        flat_local = local.flatten()                                          # [T*A]
        order = torch.argsort(flat_local, stable=True)                        # slots grouped by expert
        counts = torch.bincount(flat_local[order] + 1, minlength=len(w.expert_ids) + 1).tolist()
        start = counts[0]  # slots for experts held elsewhere sort first (local index -1)
        top_k = expert_ids.shape[1]
        for e, count in enumerate(counts[1:]):
            if count == 0:
                continue
            slots = order[start:start + count]                                # [n]
            start += count
            tokens = slots // top_k                                           # [n]
            h = torch.nn.functional.linear(x[tokens], w.gate_up[e],
                                           None if w.gate_up_bias is None else w.gate_up_bias[e])  # [n, 2I]
            gate_out, up_out = h.chunk(2, dim=-1)                             # [n, I] each
            y = torch.nn.functional.linear(self.activation(gate_out, up_out), w.down[e],
                                           None if w.down_bias is None else w.down_bias[e])        # [n, D]
            y = y * weights.flatten()[slots, None].to(y.dtype)
            out.index_add_(0, tokens, y)
        return out

    def _forward_one_token(self, w: ExpertWeights, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: run the token's A experts directly; sorting and scattering would cost
        more than the matmuls save. x [1, D] -> [1, D]."""
        out = torch.zeros_like(x)
        local = self._local_index[layer][expert_ids[0].cpu()].tolist()
        for e, slot in sorted((e, slot) for slot, e in enumerate(local) if e >= 0):   # expert order, as the batched path
            h = torch.nn.functional.linear(x, w.gate_up[e], None if w.gate_up_bias is None else w.gate_up_bias[e])
            gate_out, up_out = h.chunk(2, dim=-1)                             # [1, I] each
            y = torch.nn.functional.linear(self.activation(gate_out, up_out), w.down[e],
                                           None if w.down_bias is None else w.down_bias[e])        # [1, D]
            out.add_(y * weights[0, slot].to(y.dtype))
        return out
