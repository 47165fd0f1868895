"""The single-process engine: schedule, run, sample, detokenize, repeat.

`Engine.step()` is the loop body; `Engine.generate()` runs requests to
completion (tests, the CLI, benchmarks); `router.async_engine.AsyncEngine`
drives the same engine from a background thread for streaming callers.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experts.assignment import load_routing_counts
from models.checkpoint import CheckpointReader
from models.registry import load_config
from models.tokenizer import Tokenizer
from router.constraints import ConstraintFactory, GrammarConstraint
from router.detokenizer import IncrementalDetokenizer
from router.kv_cache import BlockManager, KVCache
from router.runner import ModelRunner
from router.sampling import SampleResult, Sampler, SamplingParams, SamplingState
from router.scheduler import Scheduler
from router.sequence import Sequence, Status
from router.stop import StopStringMatcher
from router.transport import Transport, TransportError, build_transport

log = logging.getLogger(__name__)

def cpu_default_dtype() -> torch.dtype:
    """bfloat16 on CPUs with native bf16 dot products (AVX512-BF16 or AMX), float32 elsewhere.

    Measured in docs/BENCHMARKS.md: on an AVX512-BF16 machine bf16 doubles batched decode and
    raises prefill by half, with batch-1 decode equal; without those instructions bf16 is
    emulated and slower than float32. GPUs always default to bfloat16.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return torch.float32
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & set(flags) else torch.float32


MAX_STEP_REPLAYS = 3  # replays of one step after expert-group failures before its requests fail
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EngineConfig:
    device: str = "auto"                   # "auto": cuda when available, else cpu
    dtype: str = "auto"                    # "auto": bfloat16 on GPU, cpu_default_dtype() on CPU
    block_size: int = 16
    num_kv_blocks: int | None = None       # overrides kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # default: 2 GiB on CPU, 80% of free memory on GPU
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None       # default: the model's max positions, capped by the cache
    enable_prefix_caching: bool = True
    skip_tokenizer_init: bool = False      # token ids in and out only (no text, no stop strings)
    # expert parallelism (see experts/group.py and router/transport.py)
    expert_groups: int = 1                 # expert-group actors; 1 with transport "local" runs in-process
    transport: str = "local"               # "local" | "collective" | "grpc"
    expert_assignment: str = "contiguous"  # "contiguous" | "balanced" (from measured routing counts)
    placement_strategy: str = "PACK"       # Ray placement group strategy for the expert groups
    overlap: bool = False                  # ping-pong two decode micro-batches (attention vs expert round trip)
    expert_group_timeout_s: float = 60.0   # how long to wait for a dead expert group to restart
    expert_group_max_restarts: int = 3     # Ray restarts of an expert-group actor before it is gone
    expert_group_cpus: float = 1           # CPUs in each expert group's placement bundle
    # Torch threads per CPU expert group (default: its CPUs). MKL picks kernels by thread count, so
    # bit-identical results with an in-process run need the same count as that process.
    expert_group_threads: int | None = None
    routing_counts: str | None = None      # JSON of measured routing counts, for expert_assignment "balanced"
    served_model_name: str | None = None   # the `model` label of metrics (default: the checkpoint's directory name)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else cpu_default_dtype()
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)} or 'auto'") from None


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed) or, from `generate`, the whole result."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None       # None while running; "stop", "length" or "abort"
    logprobs: list[SampleResult] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_time: float | None = None        # seconds from arrival to its first step; None while still queued

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher | None
    logprobs: list[SampleResult] = field(default_factory=list)
    constraint: GrammarConstraint | None = None      # from params.grammar (router/constraints.py)


class Engine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, *,
                 transport: Transport | None = None):
        from models.smollm2_moe import resolve_model

        self.config = config = config or EngineConfig()
        self.model_dir = resolve_model(str(model))
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.family, self.model_config = load_config(self.model_dir)
        mc = self.model_config

        self.trunk = self.family.build_trunk(mc)
        self.trunk.load(CheckpointReader(self.model_dir), self.dtype, self.device)
        self.trunk.eval()
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer.from_pretrained(self.model_dir, mc.model_type)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.eos_token_ids = frozenset(tokenizer_eos) | frozenset(mc.eos_token_ids)

        num_blocks = self._num_kv_blocks()
        self.kv = KVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                          self.dtype, self.device)
        capacity = num_blocks * config.block_size
        self.max_model_len = config.max_model_len or min(mc.max_position_embeddings, capacity)
        if self.max_model_len > min(mc.max_position_embeddings, capacity):
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"{mc.max_position_embeddings} positions or the KV cache's {capacity} tokens")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        if transport is None:   # last: everything that can reject the config has run
            counts = (load_routing_counts(config.routing_counts, mc.num_experts)
                      if config.routing_counts else None)
            transport = build_transport(config, self.family, mc, self.model_dir, dtype=self.dtype,
                                        device=self.device, routing_counts=counts)
        self.transport = transport
        self.runner = ModelRunner(self.trunk, self.transport, self.kv, self.device, overlap=config.overlap)
        # Embedding rows past the tokenizer's vocabulary (Qwen3 pads 151669 tokens to 151936) have no
        # text: a weak model must not sample them.
        self.sampler = Sampler(min(mc.vocab_size, self.tokenizer.vocab_size) if self.tokenizer else mc.vocab_size)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._constraints = ConstraintFactory(self.tokenizer, mc.vocab_size) if self.tokenizer else None
        log.info("engine ready: %s (%s) on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
                 self.model_dir, mc.model_type, self.device, self.dtype, num_blocks, config.block_size,
                 self.max_model_len)

    def _num_kv_blocks(self) -> int:
        c, mc = self.config, self.model_config
        if c.num_kv_blocks:
            return c.num_kv_blocks
        per_block = KVCache.bytes_per_block(mc.num_layers, c.block_size, mc.num_kv_heads, mc.head_dim, self.dtype)
        if c.kv_cache_memory_gb is not None:
            budget = c.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            budget = 0.8 * torch.cuda.mem_get_info(self.device)[0]
        else:
            budget = 2 * 2**30
        return max(int(budget // per_block), 1)

    # -- requests ---------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, saying what is wrong, for a request the engine cannot run."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not (0 <= int(t) < vocab)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine runs without one (skip_tokenizer_init)")
        if params.grammar is not None and self.tokenizer is None:
            raise ValueError("an output constraint needs a tokenizer, and this engine runs without one")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens exceed the model's context of {self.max_model_len}")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *,
                    request_id: str | None = None, tenant: str | None = None, weight: float = 1.0) -> str:
        """Queue a request. Requests of different tenants share the engine by `weight` (router/scheduler.py)."""
        self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        seq = Sequence(request_id, prompt, tenant=tenant)
        constraint = self._constraints.create(params.grammar) if params.grammar is not None else None
        self.requests[request_id] = _Request(
            seq=seq,
            params=params,
            sampling=SamplingState(params, prompt, self.eos_token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens)
            if self.tokenizer else None,
            stop_matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None,
            constraint=constraint,
        )
        self.scheduler.add(seq, weight)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        return self._output(request, [], "", "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        logits, sampled = self._execute(batch)                             # [S, V]
        self.scheduler.after_step(batch)
        requests = [self.requests[item.seq.request_id] for item in sampled]
        results = self.sampler.sample(logits, [r.sampling for r in requests], self._allowed_masks(requests))
        outputs = [self._append_token(r, result) for r, result in zip(requests, results)]
        self.scheduler.remove_finished()
        return outputs

    def _execute(self, batch):
        """Run the step; when an expert group fails mid-step, wait for it to restart and replay
        the whole step (KV writes repeat with the same values, nothing was sampled yet)."""
        for attempt in itertools.count(1):
            try:
                return self.runner.execute(batch)
            except TransportError as error:
                if attempt > MAX_STEP_REPLAYS:
                    raise
                log.warning("step failed (%s); waiting for expert group %d and replaying", error, error.group)
                self.transport.recover()

    def routing_counts(self) -> list[list[int]]:
        """Tokens routed to each expert, per MoE layer, since start: the input of `balanced` assignment."""
        return self.runner.routing_counts.tolist()

    def close(self) -> None:
        """Release the expert groups (actors, placement group, process group)."""
        self.transport.close()

    @staticmethod
    def _allowed_masks(requests: list[_Request]) -> list | None:
        """Each constrained request's token mask for this step (computed while the forward pass ran)."""
        if not any(r.constraint for r in requests):
            return None
        return [r.constraint.allowed() if r.constraint else None for r in requests]

    def _append_token(self, request: _Request, result: SampleResult) -> RequestOutput:
        seq, params, token = request.seq, request.params, result.token_id
        if request.constraint is not None:
            request.constraint.accept(token)
        seq.token_ids.append(token)
        request.sampling.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if params.logprobs is not None:
            request.logprobs.append(result)

        finish, stopped_by_string = None, False
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            finish, text = "stop", ""                  # the stopping token's text is not part of the output
        else:
            text = request.detokenizer.step([token]) if request.detokenizer else ""
            if request.stop_matcher:
                text, stopped_by_string = request.stop_matcher.feed(text)
                finish = "stop" if stopped_by_string else None
        if finish is None and (len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        if finish is not None and not stopped_by_string:
            text += self._flush(request)
        if finish is not None:
            self.scheduler.finish(seq, finish)
            del self.requests[seq.request_id]
        return self._output(request, [token], text, finish, [result] if params.logprobs is not None else None)

    def _flush(self, request: _Request) -> str:
        """Text held back at the end (an incomplete character or a possible stop-string start)."""
        tail = request.detokenizer.flush() if request.detokenizer else ""
        if request.stop_matcher is None:
            return tail
        text, stopped = request.stop_matcher.feed(tail)
        return text if stopped else text + request.stop_matcher.flush()

    def _output(self, request: _Request, token_ids, text, finish, logprobs=None) -> RequestOutput:
        seq = request.seq
        queued = None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time
        return RequestOutput(seq.request_id, token_ids, text, finish, logprobs, seq.num_prompt_tokens,
                             len(seq.output_token_ids), seq.num_cached_tokens, queued)

    # -- run to completion --------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run all prompts together (continuous batching) and return one full result per prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        results = {i: RequestOutput(i, [], "", prompt_tokens=len(p)) for i, p in zip(ids, prompts)}
        while self.has_unfinished():
            for out in self.step():
                full = results[out.request_id]
                full.token_ids += out.token_ids
                full.text += out.text
                full.finish_reason = out.finish_reason
                full.completion_tokens, full.cached_tokens = out.completion_tokens, out.cached_tokens
                if out.logprobs:
                    full.logprobs = (full.logprobs or []) + out.logprobs
        return [results[i] for i in ids]

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits [n, V] at every prompt position, from one prefill outside the scheduler's queues."""
        from router.scheduler import ScheduledSeq

        seq = Sequence("prompt-logits", [int(t) for t in prompt_token_ids])
        if not self.block_manager.can_allocate(seq, seq.num_tokens):
            raise ValueError(f"a {seq.num_tokens}-token prompt does not fit in the free KV cache")
        self.block_manager.allocate(seq, seq.num_tokens)
        try:
            logits, _ = self.runner.execute([ScheduledSeq(seq, seq.num_tokens)], all_logits=True)
        finally:
            self.block_manager.free_sequence(seq)
        return logits

    def generation_defaults(self) -> dict:
        """Sampling defaults the checkpoint recommends in generation_config.json (as vLLM applies them)."""
        path = self.model_dir / "generation_config.json"
        if not path.exists():
            return {}
        raw = json.loads(path.read_text())
        return {k: raw[k] for k in ("temperature", "top_p", "top_k") if raw.get(k) is not None}

    @property
    def prefix_cache_stats(self):
        return self.block_manager.stats
