"""The seam between the router and the experts.

`dispatch(layer, hidden [T, D], expert_ids [T, A], weights [T, A]) -> [T, D]`:
the weighted sum of the chosen experts' outputs for each token.

- `local`: the experts live in this process (the fastest single-machine path);
- `collective`: expert-group actors in one torch.distributed process group
  with the router (rank 0), formed through Ray at run time: NCCL on GPU, gloo
  on CPU, variable-size point-to-point messages;
- `grpc`: expert groups behind an `ExpertService` (protos/), for groups that
  share no process group.

Per MoE layer the distributed transports pack each group's tokens
(index_select), send to all groups at once, and combine the unweighted slot
outputs that come back with the routing weights (index_add), in the same
(expert id, slot) order as the local path, so every transport returns the same
bits. `dispatch_async` returns a handle, which lets the runner overlap one
micro-batch's attention with another's expert round trip.
"""
from __future__ import annotations

import bisect
import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from experts.bank import ExpertBank, combine

log = logging.getLogger(__name__)

# Round-trip latency histogram buckets in seconds (as Prometheus would export them).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class TransportError(RuntimeError):
    """An expert group failed mid-step; `recover()` then replaying the step may succeed."""

    def __init__(self, group: int, message: str):
        super().__init__(message)
        self.group = group


class ExpertGroupUnavailable(RuntimeError):
    """An expert group did not come back within the configured time: its requests fail."""


@dataclass
class DispatchStats:
    """Counters the metrics endpoint exports: per group and per layer, never per expert per layer."""
    transport: str
    num_groups: int
    tokens_routed: list[int] = field(default_factory=list)        # slots sent to each group
    restarts: list[int] = field(default_factory=list)             # recoveries per group
    imbalance_sum: dict[int, float] = field(default_factory=dict)  # per layer: sum of max/mean group load
    imbalance_steps: dict[int, int] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=list)      # round trips per LATENCY_BUCKETS bucket (+Inf last)
    latency_sum: float = 0.0
    latency_count: int = 0
    # Called on the engine thread with each round trip's seconds (the metrics exporter's histogram).
    on_latency: Callable[[float], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.tokens_routed = [0] * self.num_groups
        self.restarts = [0] * self.num_groups
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def record_load(self, layer: int, per_group: list[int]) -> None:
        for g, n in enumerate(per_group):
            self.tokens_routed[g] += n
        total = sum(per_group)
        if total:
            self.imbalance_sum[layer] = self.imbalance_sum.get(layer, 0.0) + max(per_group) * len(per_group) / total
            self.imbalance_steps[layer] = self.imbalance_steps.get(layer, 0) + 1

    def record_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        if self.on_latency is not None:
            self.on_latency(seconds)

    def mean_imbalance(self) -> dict[int, float]:
        return {layer: self.imbalance_sum[layer] / n for layer, n in self.imbalance_steps.items()}


class Pending:
    """The result of a dispatch in flight; `wait()` -> [T, D]."""

    def __init__(self, finish: Callable[[], torch.Tensor]):
        self._finish = finish
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._finish()
        return self._result


class Transport(Protocol):
    stats: DispatchStats

    def dispatch_async(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                       weights: torch.Tensor) -> Pending: ...

    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor: ...

    def recover(self) -> None: ...

    def close(self) -> None: ...


class LocalTransport:
    """Experts in-process: the fastest single-machine path."""

    def __init__(self, bank: ExpertBank):
        self.bank = bank
        self.assignment = [bank.expert_ids]
        self.stats = DispatchStats("local", 1)

    def dispatch(self, layer, hidden, expert_ids, weights):
        return self.bank.forward(layer, hidden, expert_ids, weights)

    def dispatch_async(self, layer, hidden, expert_ids, weights) -> Pending:
        out = self.dispatch(layer, hidden, expert_ids, weights)
        return Pending(lambda: out)

    def recover(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Plan:
    """Who gets what for one layer: per group, the token rows it receives and the flat slots
    (in (expert id, slot) order) its reply rows belong to."""
    tokens: list[torch.Tensor]
    slots: list[torch.Tensor]


class _RemoteTransport:
    """What the collective and grpc transports share: planning, combining, statistics, recovery."""

    name = "remote"

    def __init__(self, num_experts: int, assignment: list[list[int]], actors: list, *,
                 timeout_s: float, placement_group=None):
        self.assignment = assignment
        self.actors = actors
        self.placement_group = placement_group
        self.timeout_s = timeout_s
        self.group_of_expert = torch.empty(num_experts, dtype=torch.long)
        for g, experts in enumerate(assignment):
            self.group_of_expert[experts] = g
        self.stats = DispatchStats(self.name, len(assignment))
        self._last_pids: list[int | None] = [None] * len(actors)
        self.echo = False   # benchmarks: groups reply without running experts (the transport's own cost)

    def _plan(self, layer: int, expert_ids: torch.Tensor) -> _Plan:
        top_k = expert_ids.shape[1]
        flat = expert_ids.flatten().cpu()                                       # [T*A]
        order = torch.argsort(flat, stable=True)                                # slots by expert
        group_of_slot = self.group_of_expert[flat]                              # [T*A]
        tokens, slots = [], []
        for g in range(len(self.assignment)):
            mine = group_of_slot.view(-1, top_k) == g                           # [T, A]
            tokens.append(mine.any(dim=1).nonzero().flatten())                  # [n_g]
            slots.append(order[group_of_slot[order] == g])                      # [S_g]
        self.stats.record_load(layer, [len(s) for s in slots])
        return _Plan(tokens, slots)

    @staticmethod
    def _combine(hidden, expert_ids, weights, plan: _Plan, outputs: list[torch.Tensor]) -> torch.Tensor:
        slots = torch.cat(plan.slots)                                           # [S]
        rows = torch.cat([o.to(hidden.device, hidden.dtype) for o in outputs])  # [S, D]
        # Each group's rows are in expert order; a stable sort by expert interleaves the groups
        # back into the global (expert id, slot) order the local path adds in.
        order = torch.argsort(expert_ids.flatten().cpu()[slots], stable=True)
        return combine(hidden, expert_ids, weights, slots[order].to(hidden.device), rows[order.to(rows.device)])

    def dispatch(self, layer, hidden, expert_ids, weights):
        return self.dispatch_async(layer, hidden, expert_ids, weights).wait()

    def _wait_for_groups(self) -> list[dict]:
        """Block until every group answers (a dead one is restarted by Ray), or fail clearly."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        infos = []
        for g, actor in enumerate(self.actors):
            while True:
                try:
                    infos.append(ray.get(actor.ready.remote(), timeout=max(deadline - time.monotonic(), 0.01)))
                    break
                except ray.exceptions.GetTimeoutError:
                    raise ExpertGroupUnavailable(
                        f"expert group {g} (experts {self.assignment[g]}) did not come back within "
                        f"{self.timeout_s:g} s (expert_group_timeout_s)") from None
                except ray.exceptions.ActorUnavailableError:   # restarting: ask again until the deadline
                    if time.monotonic() > deadline:
                        raise ExpertGroupUnavailable(
                            f"expert group {g} (experts {self.assignment[g]}) is still restarting after "
                            f"{self.timeout_s:g} s (expert_group_timeout_s)") from None
                    time.sleep(0.2)
                except ray.exceptions.RayActorError as error:
                    raise ExpertGroupUnavailable(
                        f"expert group {g} (experts {self.assignment[g]}) is gone and will not restart: "
                        f"{str(error).splitlines()[0]}") from None
        return infos

    def _count_restarts(self, infos: list[dict]) -> None:
        """A group whose process id changed since we last looked was restarted by Ray."""
        for g, (old, info) in enumerate(zip(self._last_pids, infos)):
            if old is not None and old != info["pid"]:
                self.stats.restarts[g] += 1
                log.warning("expert group %d restarted (pid %s -> %s)", g, old, info["pid"])
        self._last_pids = [info["pid"] for info in infos]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self.placement_group is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:
                pass
        self.actors = []


class CollectiveTransport(_RemoteTransport):
    """Expert groups in a torch.distributed process group with the router (rank 0)."""

    name = "collective"

    def __init__(self, num_experts: int, assignment: list[list[int]], actors: list, *, top_k: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, timeout_s: float,
                 placement_group=None):
        import torch.distributed as dist

        from experts.group import node_ip

        super().__init__(num_experts, assignment, actors, timeout_s=timeout_s, placement_group=placement_group)
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.comm_device = device if self.backend == "nccl" else torch.device("cpu")
        self.top_k, self.hidden_size, self.dtype = top_k, hidden_size, dtype
        self.host = node_ip()
        self.world_size = len(actors) + 1
        self.store = dist.TCPStore(self.host, 0, self.world_size, True,
                                   datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.generation = 0
        self.pg = None
        self._count_restarts(self._wait_for_groups())
        self._form()

    def _form(self) -> None:
        """(Re-)form the process group: every group joins generation N, then the router does."""
        import ray
        import torch.distributed as dist

        from experts.group import process_group

        if self.pg is not None:
            try:
                self.pg.abort()
            except Exception:
                pass
        self.generation += 1
        ray.get([actor.join_collective.remote(self.host, self.store.port, rank + 1, self.world_size,
                                              self.backend, self.generation, self.timeout_s)
                 for rank, actor in enumerate(self.actors)], timeout=self.timeout_s)
        self.pg = process_group(self.backend, dist.PrefixStore(f"expertmesh/{self.generation}", self.store),
                                0, self.world_size, self.timeout_s)
        log.info("collective transport: process group %d formed over %s with %d expert groups at %s:%d",
                 self.generation, self.backend, len(self.actors), self.host, self.store.port)

    def dispatch_async(self, layer, hidden, expert_ids, weights) -> Pending:
        from experts.group import OP_DISPATCH, OP_ECHO, TAG, pack

        plan = self._plan(layer, expert_ids)
        start = time.perf_counter()
        sends, receives = [], []                                               # keep buffers alive
        for g, tokens in enumerate(plan.tokens):
            if len(tokens) == 0:
                continue
            tokens_dev = tokens.to(hidden.device)
            op = OP_ECHO if self.echo else OP_DISPATCH
            header = torch.tensor([op, layer, len(tokens)], dtype=torch.long, device=self.comm_device)
            payload = pack(expert_ids.index_select(0, tokens_dev), hidden.index_select(0, tokens_dev)).to(self.comm_device)
            reply = torch.empty((len(plan.slots[g]), self.hidden_size), dtype=self.dtype, device=self.comm_device)
            try:
                sends += [(self.pg.send([header], g + 1, TAG), header), (self.pg.send([payload], g + 1, TAG), payload)]
                receives.append((g, self.pg.recv([reply], g + 1, TAG), reply))
            except RuntimeError as error:   # a broken connection can fail the post itself
                raise TransportError(g, f"collective dispatch of layer {layer} to expert group {g} failed: {error}") from error

        def finish() -> torch.Tensor:
            outputs = [torch.empty((0, self.hidden_size), dtype=self.dtype)] * len(plan.tokens)
            try:
                for work, _ in sends:
                    work.wait()
                for g, work, reply in receives:
                    work.wait()
                    outputs[g] = reply
            except RuntimeError as error:
                g = next((g for g, w, _ in receives if not w.is_completed()), receives[0][0] if receives else 0)
                raise TransportError(g, f"collective dispatch of layer {layer} failed: {error}") from error
            self.stats.record_latency(time.perf_counter() - start)
            return self._combine(hidden, expert_ids, weights, plan, outputs)

        return Pending(finish)

    def recover(self) -> None:
        """After a failed step: wait for restarted groups, re-form the process group."""
        self._count_restarts(self._wait_for_groups())
        self._form()

    def close(self) -> None:
        from experts.group import OP_STOP, TAG

        if self.pg is not None:
            stop = torch.tensor([OP_STOP, 0, 0], dtype=torch.long, device=self.comm_device)
            try:   # let the groups leave quietly before the group goes away
                for work in [self.pg.send([stop], rank + 1, TAG) for rank in range(len(self.actors))]:
                    work.wait(datetime.timedelta(seconds=5))
            except Exception:
                pass
            try:
                self.pg.abort()
            except Exception:
                pass
            self.pg = None
        super().close()


class GrpcTransport(_RemoteTransport):
    """Expert groups behind `ExpertService` servers; all groups are called at once (futures)."""

    name = "grpc"

    def __init__(self, num_experts: int, assignment: list[list[int]], actors: list, *,
                 hidden_size: int, dtype: torch.dtype, timeout_s: float, placement_group=None):
        super().__init__(num_experts, assignment, actors, timeout_s=timeout_s, placement_group=placement_group)
        self.hidden_size, self.dtype = hidden_size, dtype
        infos = self._wait_for_groups()
        self._count_restarts(infos)
        self._connect(infos)

    def _connect(self, infos: list[dict]) -> None:
        import grpc

        from protos import expert_transport_pb2_grpc as pb_grpc

        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.addresses = [info["grpc_address"] for info in infos]
        self.channels = [grpc.insecure_channel(address, options=options) for address in self.addresses]
        self.stubs = [pb_grpc.ExpertServiceStub(channel) for channel in self.channels]
        log.info("grpc transport: expert groups at %s", ", ".join(self.addresses))

    def dispatch_async(self, layer, hidden, expert_ids, weights) -> Pending:
        import grpc

        from experts.group import tensor_from_proto, tensor_to_proto
        from protos import expert_transport_pb2 as pb

        plan = self._plan(layer, expert_ids)
        start = time.perf_counter()
        calls = []
        for g, tokens in enumerate(plan.tokens):
            if len(tokens) == 0:
                continue
            tokens_dev = tokens.to(hidden.device)
            request = pb.DispatchRequest(layer=layer, hidden=tensor_to_proto(hidden.index_select(0, tokens_dev)),
                                         expert_ids=tensor_to_proto(expert_ids.index_select(0, tokens_dev).to(torch.int32)),
                                         echo=self.echo)
            calls.append((g, self.stubs[g].Dispatch.future(request, timeout=self.timeout_s)))

        def finish() -> torch.Tensor:
            outputs = [torch.empty((0, self.hidden_size), dtype=self.dtype)] * len(plan.tokens)
            for g, call in calls:
                try:
                    outputs[g] = tensor_from_proto(call.result().outputs)
                except grpc.RpcError as error:
                    for _, other in calls:
                        other.cancel()
                    raise TransportError(g, f"grpc dispatch of layer {layer} to expert group {g} at "
                                            f"{self.addresses[g]} failed: {error.code().name} {error.details()}") from None
            self.stats.record_latency(time.perf_counter() - start)
            return self._combine(hidden, expert_ids, weights, plan, outputs)

        return Pending(finish)

    def recover(self) -> None:
        infos = self._wait_for_groups()
        self._count_restarts(infos)
        for channel in self.channels:
            channel.close()
        self._connect(infos)

    def close(self) -> None:
        for channel in getattr(self, "channels", []):
            channel.close()
        super().close()


TRANSPORTS = ("local", "collective", "grpc")


def build_transport(config, family, model_config, model_dir, *, dtype: torch.dtype,
                    device: torch.device, routing_counts: list[float] | None = None):
    """The transport `EngineConfig` asks for; spawns the expert-group actors (starting a local
    Ray, or joining RAY_ADDRESS, when none is running)."""
    from experts.assignment import assign_experts, describe

    if config.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {config.transport!r}")
    if config.transport == "local":
        if config.expert_groups != 1:
            raise ValueError("the local transport runs every expert in this process; use expert_groups 1, "
                             "or transport collective or grpc for several expert groups")
        return LocalTransport(ExpertBank.load(family, model_config, model_dir, dtype=dtype, device=device))

    import ray

    from experts.group import ExpertGroup

    assignment = assign_experts(model_config.num_experts, config.expert_groups, config.expert_assignment,
                                routing_counts)
    log.info("expert assignment (%s): %s", config.expert_assignment, describe(assignment))
    if not ray.is_initialized():
        # Started here (a CLI, a script): expert-group logs stay in Ray's log files, not our stdout.
        ray.init(configure_logging=False, log_to_driver=False)
    use_gpu = device.type == "cuda"
    pg, actors = ExpertGroup.spawn(model_dir, assignment, dtype=dtype, use_gpu=use_gpu,
                                   serve_grpc=config.transport == "grpc", strategy=config.placement_strategy,
                                   cpus_per_group=config.expert_group_cpus, threads=config.expert_group_threads,
                                   max_restarts=config.expert_group_max_restarts,
                                   model_name=config.served_model_name or Path(model_dir).name)
    try:
        if config.transport == "collective":
            return CollectiveTransport(model_config.num_experts, assignment, actors, top_k=model_config.top_k,
                                       hidden_size=model_config.hidden_size, dtype=dtype, device=device,
                                       timeout_s=config.expert_group_timeout_s, placement_group=pg)
        return GrpcTransport(model_config.num_experts, assignment, actors, hidden_size=model_config.hidden_size,
                             dtype=dtype, timeout_s=config.expert_group_timeout_s, placement_group=pg)
    except Exception:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(pg)
        raise
