"""The seam between the router and the experts.

`dispatch(layer, hidden [T, D], expert_ids [T, A], weights [T, A]) -> [T, D]`:
the weighted sum of the chosen experts' outputs for each token. `local`
runs the experts in this process; the distributed transports (collective,
grpc) send each expert group its tokens and combine what comes back.
"""
from __future__ import annotations

from typing import Protocol

import torch

from experts.bank import ExpertBank


class Transport(Protocol):
    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


class LocalTransport:
    """Experts in-process: the fastest single-machine path."""

    def __init__(self, bank: ExpertBank):
        self.bank = bank

    def dispatch(self, layer, hidden, expert_ids, weights):
        return self.bank.forward(layer, hidden, expert_ids, weights)

    def close(self) -> None:
        pass
