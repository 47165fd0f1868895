"""`expertmesh bench dispatch`: what expert parallelism costs, measured in one process tree.

1. Decode tokens/s of the same model with the experts in-process (`local`) and
   behind 1, 2 and 4 expert-group actors over `collective` and `grpc`, at batch 1
   and at 32 concurrent requests, the latter with and without micro-batch overlap.
2. The per-layer round trip of each transport against the floor: raw
   torch.distributed send/recv of the same bytes between the same processes
   (router and expert-group actors), with the groups replying without computing
   (echo), so both sides move identical messages and only the transport differs.

Prints tables and ratios; the numbers go into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import platform
import statistics
import time

import torch

from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams


def _prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(count)]


def decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Generated tokens/s once every request has its first token (prefill excluded)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = {engine.add_request(p, params) for p in prompts}
    started: set[str] = set()
    while started != ids:
        started |= {out.request_id for out in engine.step()}
    produced, start = 0, time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(out.token_ids) for out in engine.step())
    return produced / (time.perf_counter() - start)


def layer_inputs(engine: Engine, tokens: int, seed: int = 0):
    """A realistic MoE-layer input: hidden states and the gate's own choice for them."""
    mc = engine.model_config
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((tokens, mc.hidden_size), generator=g).to(engine.device, engine.dtype)
    layer = engine.trunk.layers[mc.moe_layers[0]]
    with torch.inference_mode():
        ids, weights = layer.route(hidden)
    return mc.moe_layers[0], hidden, ids, weights


def time_dispatch(transport, layer, hidden, ids, weights, repeats: int) -> float:
    """Median seconds of one dispatch round trip."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 3):
            start = time.perf_counter()
            transport.dispatch(layer, hidden, ids, weights)
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def time_raw_floor(collective, layer, hidden, ids, repeats: int) -> float:
    """Median seconds of raw pg.send/recv of the bytes a dispatch moves: to every group at once
    the same header and payload, back the same reply size (groups echo, no compute)."""
    from experts.group import OP_ECHO, TAG, pack

    plan = collective._plan(layer, ids)
    messages = []
    for g, tokens in enumerate(plan.tokens):
        if len(tokens):
            header = torch.tensor([OP_ECHO, layer, len(tokens)], dtype=torch.long)
            payload = pack(ids[tokens], hidden[tokens]).cpu()
            reply = torch.empty((len(plan.slots[g]), hidden.shape[1]), dtype=hidden.dtype)
            messages.append((g + 1, header, payload, reply))
    pg, times = collective.pg, []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        works = []
        for rank, header, payload, reply in messages:
            works += [pg.send([header], rank, TAG), pg.send([payload], rank, TAG), pg.recv([reply], rank, TAG)]
        for work in works:
            work.wait()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main(model: str = "smollm2-moe", dtype: str = "auto", quick: bool = False) -> int:
    import ray

    from router.transport import CollectiveTransport

    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=False, num_cpus=16)   # actors are placed, not CPU-bound
    new_tokens, concurrent, repeats = (8, 8, 10) if quick else (32, 32, 50)
    group_counts = (1, 2) if quick else (1, 2, 4)
    base = dict(device="cpu", dtype=dtype, num_kv_blocks=1024, skip_tokenizer_init=True)

    configs = [("local", 1)] + [(t, n) for t in ("collective", "grpc") for n in group_counts]
    decode_rows, trip_rows = [], []
    reference = {}
    for transport, groups in configs:
        engine = Engine(model, EngineConfig(**base, transport=transport, expert_groups=groups))
        vocab = engine.model_config.vocab_size
        one = _prompts(1, 16, vocab)
        many = _prompts(concurrent, 16, vocab, seed=1)
        decode_rate(engine, one, 4)                                        # warm up
        row = {"batch1": decode_rate(engine, one, new_tokens),
               "many": decode_rate(engine, many, new_tokens)}
        engine.runner.overlap = True
        row["many_overlap"] = decode_rate(engine, many, new_tokens)
        engine.runner.overlap = False
        if transport == "local":
            reference = row
        decode_rows.append((transport, groups, row))

        if transport != "local":
            floor_transport = engine.transport if transport == "collective" else CollectiveTransport(
                engine.model_config.num_experts, engine.transport.assignment, engine.transport.actors,
                top_k=engine.model_config.top_k, hidden_size=engine.model_config.hidden_size,
                dtype=engine.dtype, device=engine.device, timeout_s=60)
            for tokens in (1, concurrent):
                layer, hidden, ids, weights = layer_inputs(engine, tokens)
                full = time_dispatch(engine.transport, layer, hidden, ids, weights, repeats)
                engine.transport.echo = True
                echo = time_dispatch(engine.transport, layer, hidden, ids, weights, repeats)
                engine.transport.echo = False
                floor = time_raw_floor(floor_transport, layer, hidden, ids, repeats)
                trip_rows.append((transport, groups, tokens, full, echo, floor))
            if floor_transport is not engine.transport:
                floor_transport.pg.abort()
        engine.close()

    print(f"model {model}, dtype {engine.dtype}, cpu, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{new_tokens} new tokens, 16-token prompts")
    print()
    print(f"| transport | groups | batch-1 tok/s | vs local | {concurrent} concurrent tok/s | vs local "
          f"| {concurrent} concurrent, overlap | vs local |")
    print("|---|---|---|---|---|---|---|---|")
    for transport, groups, row in decode_rows:
        ratio = lambda key: f"{row[key] / reference[key if key != 'many_overlap' else 'many']:.0%}"
        print(f"| {transport} | {groups} | {row['batch1']:.1f} | {ratio('batch1')} | {row['many']:.1f} | "
              f"{ratio('many')} | {row['many_overlap']:.1f} | {ratio('many_overlap')} |")
    print()
    print("| transport | groups | tokens | round trip (with experts) | round trip (echo) | raw send/recv floor | echo / floor |")
    print("|---|---|---|---|---|---|---|")
    for transport, groups, tokens, full, echo, floor in trip_rows:
        print(f"| {transport} | {groups} | {tokens} | {full * 1e6:.0f} µs | {echo * 1e6:.0f} µs | "
              f"{floor * 1e6:.0f} µs | {echo / floor:.2f}x |")
    return 0
