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
    def expert_outputs(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, A] (global ids) -> unweighted outputs [S, D] of the S slots
        routed to experts held here, ordered by (expert id, slot): `held_slot_order` says which.

        This is what an expert group returns to the router; `forward` combines it.
        """
        w = self.layers[layer]
        local = self._local_index[layer].to(expert_ids.device)[expert_ids].flatten()   # [T*A]
        order = torch.argsort(local, stable=True)                                      # slots by expert
        counts = torch.bincount(local + 1, minlength=len(w.expert_ids) + 1).tolist()
        order = order[counts[0]:]             # slots of experts held elsewhere (index -1) sort first
        tokens = order // expert_ids.shape[1]                                          # [S]
        outputs, start = [], 0
        for e, count in enumerate(counts[1:]):
            if count == 0:
                continue
            rows = x if x.shape[0] == 1 else x[tokens[start:start + count]]             # [n, D]
            start += count
            h = torch.nn.functional.linear(rows, w.gate_up[e],
                                           None if w.gate_up_bias is None else w.gate_up_bias[e])  # [n, 2I]
            gate_out, up_out = h.chunk(2, dim=-1)                                      # [n, I] each
            outputs.append(torch.nn.functional.linear(self.activation(gate_out, up_out), w.down[e],
                                                      None if w.down_bias is None else w.down_bias[e]))  # [n, D]
        return torch.cat(outputs) if outputs else x.new_zeros((0, x.shape[1]))

    def held_slot_order(self, layer: int, expert_ids: torch.Tensor) -> torch.Tensor:
        """The flat slot indices [S] that `expert_outputs` returns rows for, in its order."""
        local = self._local_index[layer].to(expert_ids.device)[expert_ids].flatten()
        order = torch.argsort(local, stable=True)
        return order[int((local < 0).sum()):]

    @torch.no_grad()
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, A] (global ids), weights [T, A] -> sum over the held experts [T, D].

        Slots routed to experts held elsewhere contribute nothing here.
        """
        y = self.expert_outputs(layer, x, expert_ids)                                  # [S, D]
        return combine(x, expert_ids, weights, self.held_slot_order(layer, expert_ids), y)


def combine(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
            outputs: torch.Tensor) -> torch.Tensor:
    """Weighted sum per token of expert outputs [S, D] for flat slots [S] -> [T, D].

    Rows are added in the order given; every transport passes them in (expert id, slot)
    order, so the sums, and the tokens, are the same bit for bit whichever process ran them.
    """
    out = torch.zeros_like(x)                                                          # [T, D]
    if slots.numel():
        scale = weights.flatten()[slots].to(outputs.dtype)[:, None]                    # [S, 1]
        out.index_add_(0, slots // expert_ids.shape[1], outputs * scale)
    return out
