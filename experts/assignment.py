"""Which expert group holds which experts.

`contiguous` (the default) gives group g the g-th run of expert ids. `balanced`
uses routing counts measured on real traffic (`Engine.routing_counts()`, saved
with `expertmesh generate --record-routing FILE`) so each group gets a similar
token load, while every group keeps the same number of experts (the same memory).
The same assignment applies to every MoE layer.
"""
from __future__ import annotations

import json
from pathlib import Path

STRATEGIES = ("contiguous", "balanced")


def assign_experts(num_experts: int, num_groups: int, strategy: str = "contiguous",
                   counts: list[float] | None = None) -> list[list[int]]:
    """-> for each group, its sorted expert ids."""
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"expert_groups must be between 1 and the model's {num_experts} experts, got {num_groups}")
    if strategy not in STRATEGIES:
        raise ValueError(f"expert_assignment must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "contiguous":
        base, extra = divmod(num_experts, num_groups)
        groups, start = [], 0
        for g in range(num_groups):
            size = base + (g < extra)
            groups.append(list(range(start, start + size)))
            start += size
        return groups
    if counts is None or len(counts) != num_experts:
        raise ValueError(f"balanced assignment needs routing counts for all {num_experts} experts "
                         f"(got {None if counts is None else len(counts)})")
    # Longest-processing-time first: the busiest expert goes to the least loaded group that
    # still has room; capacity keeps the expert count (memory) per group equal.
    capacity = [len(g) for g in assign_experts(num_experts, num_groups)]
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    load = [0.0] * num_groups
    for expert in sorted(range(num_experts), key=lambda e: (-counts[e], e)):
        g = min((g for g in range(num_groups) if len(groups[g]) < capacity[g]), key=lambda g: (load[g], g))
        groups[g].append(expert)
        load[g] += counts[expert]
    return [sorted(g) for g in groups]


def load_routing_counts(path: str | Path, num_experts: int) -> list[float]:
    """Counts per expert from a JSON file: a list per expert, or a list per layer of such lists
    (as `Engine.routing_counts()` writes), summed over layers."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read routing counts from {path}: {error}") from None
    rows = raw.get("counts", raw) if isinstance(raw, dict) else raw
    if rows and isinstance(rows[0], list):
        rows = [sum(column) for column in zip(*rows)]
    if len(rows) != num_experts or not all(isinstance(c, (int, float)) and c >= 0 for c in rows):
        raise ValueError(f"routing counts in {path} must be {num_experts} non-negative numbers per layer")
    return [float(c) for c in rows]


def describe(groups: list[list[int]]) -> str:
    """A one-line summary for logs and `expertmesh status`: 'group 0: 0-3, group 1: 4-7'."""
    def runs(ids):
        out, start = [], ids[0]
        for prev, cur in zip(ids, ids[1:] + [None]):
            if cur is None or cur != prev + 1:
                out.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = cur
        return ",".join(out)
    return ", ".join(f"group {g}: experts {runs(ids)}" for g, ids in enumerate(groups))
