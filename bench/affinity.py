"""`expertmesh bench affinity`: prefix-cache hits of multi-turn conversations on 2 router replicas,
with session affinity (deployments/affinity.py) against Serve's power of two choices, in one run.

The same conversations run twice against a fresh Serve app with 2 router replicas, once with
`router.session_affinity` off and once on. All conversations run at once; each is a shared system
prompt, a document of its own and a question, then follow-up questions, every turn sending the
whole history with the conversation's `prompt_cache_key`, through the official openai client.
For each mode it prints the prefix-cache hit rate (cached / prompt tokens, from the responses'
usage, and the replicas' own counters, which must agree), the hit rate of continued turns, the
median time to first token of continued turns, and the ratios on/off. `--kv-blocks` sizes each
replica's KV cache: when it cannot hold every conversation, power of two choices also evicts what
two replicas each cached of the same conversation.
"""
from __future__ import annotations

import asyncio
import os
import platform
import random
import socket
import statistics
import time
from dataclasses import dataclass

WORDS = ("the river stone lantern orchard copper violet harbor meadow thunder cedar falcon marble ember "
         "glacier willow saffron canyon beacon quartz prairie engine signal window garden winter summer "
         "market letter station bridge mountain forest ocean island valley castle village").split()
SYSTEM = ("You are a careful assistant. Answer in one or two sentences, quote the document when you "
          "can, and say so when the document does not contain the answer. ") * 3


@dataclass
class Turn:
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def conversation(client, model: str, index: int, turns: int, max_tokens: int,
                       document_words: int, think_s: float) -> list[Turn]:
    """One conversation, turn after turn, each turn streamed (TTFT) with usage at the end, and a
    user's pause (uniform in [0, 2 * think_s]) before the next: without it the replica that just
    finished a turn is the less loaded one at the instant the next turn is routed, which gives power
    of two choices an affinity that interleaved real traffic does not."""
    rng = random.Random(index)
    key = f"bench-conversation-{index}"
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Document {index}: {text(rng, document_words)}\n\n"
                                            f"Question: what is the document about?"}]
    results = []
    for turn in range(turns):
        if turn:
            await asyncio.sleep(rng.uniform(0, 2 * think_s))
        start = time.perf_counter()
        ttft, reply, usage = None, [], None
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, prompt_cache_key=key, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if ttft is None:
                ttft = time.perf_counter() - start
            if chunk.choices:
                reply.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        results.append(Turn(usage.prompt_tokens, cached or 0, ttft))
        messages += [{"role": "assistant", "content": "".join(reply)},
                     {"role": "user", "content": f"And what about the {rng.choice(WORDS)} and the "
                                                 f"{rng.choice(WORDS)}? {text(rng, 12)}"}]
    return results


async def replica_counters(app_name: str) -> dict[str, dict]:
    """Router.stats of both replicas (an unkeyed call goes to either; ask until both answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("Router", app_name=app_name)
    stats: dict[str, dict] = {}
    for _ in range(600):
        one = await handle.stats.remote()
        stats[one["replica"]] = one
        if len(stats) == 2:
            return stats
        await asyncio.sleep(0.1)
    raise RuntimeError(f"only router replicas {sorted(stats)} answered")


def run_mode(base_url: str, model: str, source: str, dtype: str, affinity: bool, conversations: int,
             turns: int, max_tokens: int, document_words: int, kv_blocks: int, think_s: float) -> dict:
    import openai
    from ray import serve

    from cluster.config import ClusterConfig
    from deployments.app import build_app

    name = f"bench-affinity-{'on' if affinity else 'off'}"
    config = ClusterConfig.model_validate({
        "name": name,
        "model": {"source": source, "id": model, "dtype": dtype, "max_model_len": 4096},
        "engine": {"max_num_seqs": max(conversations, 1), "max_queued_requests": conversations,
                   "num_kv_blocks": kv_blocks, "max_num_batched_tokens": 2048},
        "ingress": {"ray_actor_options": {"num_cpus": 0}},
        "router": {"num_replicas": 2, "session_affinity": affinity, "ray_actor_options": {"num_cpus": 0}},
        "http": {"route_prefix": f"/{name}"},
    })
    serve.run(build_app(config), name=name, route_prefix=config.http.route_prefix)
    try:
        async def drive():
            client = openai.AsyncOpenAI(base_url=f"{base_url}/{name}/v1", api_key="unused", max_retries=0,
                                        timeout=1800)
            before = await replica_counters(name)
            start = time.perf_counter()
            results = await asyncio.gather(*(conversation(client, model, i, turns, max_tokens, document_words,
                                                          think_s) for i in range(conversations)))
            elapsed = time.perf_counter() - start
            after = await replica_counters(name)
            return results, before, after, elapsed

        results, before, after, elapsed = asyncio.run(drive())
    finally:
        serve.delete(name)
    every = [t for conv in results for t in conv]
    continued = [t for conv in results for t in conv[1:]]
    queries = sum(after[r]["prefix_cache_queries"] - before[r]["prefix_cache_queries"] for r in after)
    hits = sum(after[r]["prefix_cache_hits"] - before[r]["prefix_cache_hits"] for r in after)
    return {
        "hit_rate": sum(t.cached_tokens for t in every) / sum(t.prompt_tokens for t in every),
        "continued_hit_rate": sum(t.cached_tokens for t in continued) / max(sum(t.prompt_tokens for t in continued), 1),
        "engine_hit_rate": hits / max(queries, 1),
        "prompt_tokens": sum(t.prompt_tokens for t in every),
        "computed_tokens": sum(t.prompt_tokens - t.cached_tokens for t in every),
        "ttft_first": statistics.median(conv[0].ttft_s for conv in results),
        "ttft_continued": statistics.median(t.ttft_s for t in continued) if continued else float("nan"),
        "per_replica_prompt_tokens": sorted(after[r]["prefix_cache_queries"] - before[r]["prefix_cache_queries"]
                                            for r in after),
        "elapsed": elapsed,
    }


def main(model: str = "smollm2-moe", dtype: str = "auto", conversations: int = 8, turns: int = 4,
         kv_blocks: int = 2048, think_s: float = 2.0, quick: bool = False) -> int:
    import ray
    from ray import serve

    from cluster.config import ClusterConfig
    from cluster.serve import http_address
    from models.smollm2_moe import resolve_model

    if quick:
        conversations, turns = min(conversations, 4), min(turns, 3)
    max_tokens, document_words = (16, 120) if quick else (32, 250)
    source = str(resolve_model(model))
    served = model if model == "smollm2-moe" else os.path.basename(source.rstrip("/"))
    address = os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized() and not address
    if not ray.is_initialized():
        ray.init(address=address or None, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # A Serve instance already running on the cluster keeps the HTTP options it was started with.
    host, port = http_address(ClusterConfig.model_validate({"http": {"port": port}}))
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    print(f"model {served}, dtype {dtype}, 2 router replicas with {kv_blocks} KV blocks of 16 tokens each, "
          f"{conversations} conversations x {turns} turns (all at once, {think_s:g}s mean pause between turns), "
          f"{max_tokens} tokens per reply, "
          f"{os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}", flush=True)
    try:
        modes = {}
        for affinity in (False, True):
            modes[affinity] = run_mode(base_url, served, source, dtype, affinity, conversations, turns,
                                       max_tokens, document_words, kv_blocks, think_s)
            print(f"  affinity {'on ' if affinity else 'off'}: done in {modes[affinity]['elapsed']:.1f}s, "
                  f"prompt tokens per replica {modes[affinity]['per_replica_prompt_tokens']}", flush=True)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
    off, on = modes[False], modes[True]
    rows = [("prefix-cache hit rate, all turns (cached / prompt tokens)", "hit_rate", "{:.1%}"),
            ("  the replicas' own counters", "engine_hit_rate", "{:.1%}"),
            ("prefix-cache hit rate, continued turns", "continued_hit_rate", "{:.1%}"),
            ("prompt tokens computed (not cached)", "computed_tokens", "{:d}"),
            ("median TTFT, first turns (s)", "ttft_first", "{:.2f}"),
            ("median TTFT, continued turns (s)", "ttft_continued", "{:.2f}"),
            ("wall time of the run (s)", "elapsed", "{:.1f}")]
    print("\n| measure | affinity off (power of two) | affinity on | on / off |\n|---|---|---|---|")
    for label, key, fmt in rows:
        ratio = on[key] / off[key] if off[key] else float("nan")
        print(f"| {label} | {fmt.format(off[key])} | {fmt.format(on[key])} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
