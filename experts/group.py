"""The expert group: a Ray actor holding a slice of the experts of every MoE layer.

An `ExpertGroup` reads only its own experts' tensors from the checkpoint (lazy
safetensors reads), and serves them to the router over the transport it was
started for:

- `collective`: it joins a torch.distributed process group that the router
  forms through Ray (`join_collective`: rank, store address and port chosen at
  run time) and answers, on a background thread, one message pair per layer:
  header [op, layer, n] then payload (expert ids int32 [n, A] + hidden [n, D]),
  reply: unweighted outputs [S, D] of the slots routed to its experts.
- `grpc`: it runs an `ExpertService` server (protos/expert_transport.proto) on
  a port the OS picks; `ready()` says where.

The class owns its resource and placement rules (`bundle`, `spawn`): one GPU
per group on GPU clusters, one CPU bundle per group otherwise, all in one Ray
placement group (PACK by default). Actors restart on failure; the router
re-forms the process group and replays the step (router/transport.py).
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import torch

from experts.bank import ExpertBank
from experts.metrics import GroupMetrics
from models.registry import load_config

log = logging.getLogger(__name__)

OP_DISPATCH, OP_STOP, OP_ECHO = 1, 0, 2   # OP_ECHO: reply zeros of the right shape, no compute (bench floor)
TAG = 0


def process_group(backend: str, store, rank: int, world_size: int, timeout_s: float):
    """A torch.distributed process group object of its own (not the process-global default
    group), so several engines, and a re-formed group after a restart, can live in one process."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"unknown torch.distributed backend {backend!r} (gloo or nccl)")


def pack(expert_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """expert ids [n, A] and hidden [n, D] -> one uint8 payload (ids first, 4-byte aligned)."""
    return torch.cat([expert_ids.to(torch.int32).reshape(-1).view(torch.uint8),
                      hidden.contiguous().reshape(-1).view(torch.uint8)])


def unpack(payload: torch.Tensor, n: int, top_k: int, hidden_size: int, dtype: torch.dtype):
    split = n * top_k * 4
    expert_ids = payload[:split].view(torch.int32).view(n, top_k).long()
    hidden = payload[split:].view(dtype).view(n, hidden_size)
    return expert_ids, hidden


def node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


class ExpertGroup:
    """One slice of the experts. Plain class; `spawn` runs it as Ray actors."""

    def __init__(self, model_dir: str, group: int, expert_ids: list[int], *, dtype: str, device: str,
                 serve_grpc: bool = False, num_threads: int | None = None, model_name: str | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.group = group
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.family, self.config = load_config(Path(model_dir))
        self.bank = ExpertBank.load(self.family, self.config, model_dir, expert_ids,
                                    dtype=self.dtype, device=self.device)
        self.expert_ids = list(expert_ids)
        self.metrics = GroupMetrics.in_ray(model_name or Path(model_dir).name, group)
        self._generation = 0
        self._serving: threading.Thread | None = None
        self._pg = None
        self._grpc_server = None
        self.grpc_address: str | None = None
        if serve_grpc:
            self._start_grpc()
        log.info("expert group %d ready: experts %s on %s/%s", group, self.expert_ids, self.device, self.dtype)

    # -- resources and placement ---------------------------------------------------------------

    @staticmethod
    def bundle(use_gpu: bool, cpus: float = 1) -> dict:
        """What one group needs: one GPU (and a CPU to drive it) on GPU clusters, CPUs otherwise."""
        return {"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus}

    @classmethod
    def spawn(cls, model_dir: str | Path, assignment: list[list[int]], *, dtype: torch.dtype,
              use_gpu: bool, serve_grpc: bool, strategy: str = "PACK", cpus_per_group: float = 1,
              threads: int | None = None, max_restarts: int = 3, ready_timeout_s: float = 600,
              model_name: str | None = None):
        """Start one actor per group, each in its own bundle of one placement group.

        -> (placement group, actor handles). Blocks until every group has loaded its experts.
        """
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [cls.bundle(use_gpu, cpus_per_group) for _ in assignment]
        pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(f"the cluster cannot place {len(bundles)} expert groups of {bundles[0]} "
                               f"(strategy {strategy}) within {ready_timeout_s:.0f} s") from None
        actor_cls = ray.remote(cls)
        actors = []
        for g, experts in enumerate(assignment):
            actors.append(actor_cls.options(
                name=None,
                num_cpus=cpus_per_group,
                num_gpus=1 if use_gpu else 0,
                max_restarts=max_restarts,
                max_concurrency=4,            # ready()/join_collective() answer while a step is served
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=g),
            ).remote(str(model_dir), g, experts, dtype=str(dtype).removeprefix("torch."),
                     device="cuda" if use_gpu else "cpu", serve_grpc=serve_grpc,
                     num_threads=None if use_gpu else threads or max(int(cpus_per_group), 1),
                     model_name=model_name))
        try:
            ray.get([a.ready.remote() for a in actors], timeout=ready_timeout_s)
        except Exception:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            ray.util.remove_placement_group(pg)
            raise
        return pg, actors

    # -- control (called by the router through Ray) ------------------------------------------------

    def ready(self) -> dict:
        return {"group": self.group, "expert_ids": self.expert_ids, "pid": os.getpid(),
                "device": str(self.device), "grpc_address": self.grpc_address}

    def join_collective(self, host: str, port: int, rank: int, world_size: int, backend: str,
                        generation: int, timeout_s: float) -> None:
        """Join process group `generation` (rank 0 is the router) and serve it on a background thread.

        Returns at once: the router forms its side concurrently, and forming blocks until all joined.
        A later generation (after a restart elsewhere) replaces this one.
        """
        self._generation = generation
        old = self._pg
        if old is not None:
            try:
                old.abort()
            except Exception:
                pass
        self._serving = threading.Thread(target=self._serve_collective, name=f"expert-group-{generation}",
                                         args=(host, port, rank, world_size, backend, generation, timeout_s),
                                         daemon=True)
        self._serving.start()

    def shutdown(self) -> None:
        self._generation = -1
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None)

    # -- the collective transport, server side -------------------------------------------------

    def _serve_collective(self, host, port, rank, world_size, backend, generation, timeout_s):
        import torch.distributed as dist

        try:
            store = dist.TCPStore(host, port, world_size, False, datetime.timedelta(seconds=timeout_s))
            pg = process_group(backend, dist.PrefixStore(f"expertmesh/{generation}", store), rank,
                               world_size, timeout_s)
        except Exception:
            log.exception("expert group %d could not join process group %d", self.group, generation)
            return
        self._pg = pg
        comm = self.device if backend == "nccl" else torch.device("cpu")
        config, top_k = self.config, self.config.top_k
        header = torch.empty(3, dtype=torch.long, device=comm)
        idle = datetime.timedelta(days=365)   # waiting for the next step is not a failure, however long
        try:
            while self._generation == generation:
                pg.recv([header], 0, TAG).wait(idle)
                op, layer, n = header.tolist()
                if op == OP_STOP:
                    break
                nbytes = n * top_k * 4 + n * config.hidden_size * self.dtype.itemsize
                payload = torch.empty(nbytes, dtype=torch.uint8, device=comm)
                pg.recv([payload], 0, TAG).wait()
                start = time.perf_counter()
                expert_ids, hidden = unpack(payload, n, top_k, config.hidden_size, self.dtype)
                if op == OP_ECHO:
                    rows = len(self.bank.held_slot_order(layer, expert_ids))
                    outputs = torch.zeros((rows, config.hidden_size), dtype=self.dtype, device=comm)
                else:
                    outputs = self.bank.expert_outputs(layer, hidden.to(self.device), expert_ids.to(self.device))
                pg.send([outputs.to(comm).contiguous()], 0, TAG).wait()
                if self.metrics is not None:
                    self.metrics.served(len(outputs), time.perf_counter() - start)
        except Exception as error:  # the router went away or re-formed the group: wait for the next join
            if self._generation == generation:
                log.warning("expert group %d left process group %d: %s", self.group, generation, error)

    # -- the grpc transport, server side -----------------------------------------------------------

    def _start_grpc(self) -> None:
        import grpc

        from protos import expert_transport_pb2_grpc as pb_grpc

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.max_receive_message_length", -1),
                                      ("grpc.max_send_message_length", -1)])
        pb_grpc.add_ExpertServiceServicer_to_server(_ExpertServicer(self), server)
        host = node_ip()
        port = server.add_insecure_port(f"{host}:0")
        server.start()
        self._grpc_server = server
        self.grpc_address = f"{host}:{port}"

    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The gRPC handler's work (also callable directly): unweighted slot outputs [S, D]."""
        return self.bank.expert_outputs(layer, hidden.to(self.device, self.dtype), expert_ids.to(self.device))


def tensor_to_proto(tensor: torch.Tensor):
    from protos import expert_transport_pb2 as pb

    tensor = tensor.detach().contiguous().cpu()
    return pb.Tensor(dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                     data=tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_from_proto(message) -> torch.Tensor:
    dtype = getattr(torch, message.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {message.dtype!r}")
    shape = tuple(message.shape)
    if not message.data:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=torch.uint8).view(dtype)
    if flat.numel() != torch.Size(shape).numel():
        raise ValueError(f"tensor of shape {shape} and dtype {message.dtype} cannot hold {len(message.data)} bytes")
    return flat.view(shape)


class _ExpertServicer:
    def __init__(self, group: ExpertGroup):
        self.group = group

    def Dispatch(self, request, context):
        import grpc

        from protos import expert_transport_pb2 as pb

        start = time.perf_counter()
        try:
            hidden = tensor_from_proto(request.hidden)
            expert_ids = tensor_from_proto(request.expert_ids).long()
            if request.layer not in self.group.bank.layers:
                raise ValueError(f"layer {request.layer} is not a MoE layer of this model")
            if request.echo:   # transport cost only: the reply's shape, no expert compute
                rows = len(self.group.bank.held_slot_order(request.layer, expert_ids))
                outputs = torch.zeros((rows, hidden.shape[1]), dtype=self.group.dtype)
            else:
                outputs = self.group.dispatch(request.layer, hidden, expert_ids)
        except (ValueError, RuntimeError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        reply = pb.DispatchReply(outputs=tensor_to_proto(outputs))
        if self.group.metrics is not None:
            self.group.metrics.served(len(outputs), time.perf_counter() - start)
        return reply

    def Info(self, request, context):
        from protos import expert_transport_pb2 as pb

        g = self.group
        return pb.InfoReply(group=g.group, expert_ids=g.expert_ids, device=str(g.device))

