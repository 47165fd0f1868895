"""`expertmesh bench engine`: the engine against transformers' `generate` on the
same checkpoint and dtype, measured in one run, plus the batch-1 roofline.

Prints a table of tokens/s and the ratios. The numbers go into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import platform
import time

import torch

from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams


def measure_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s the CPU (or GPU) reads: the best of a few full passes over a large buffer."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    buf = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        buf.sum()
        _sync()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def active_weight_bytes(engine: Engine) -> int:
    """Bytes of weights one decoded token reads: the trunk (less the embedding gather) plus top-k experts per MoE layer."""
    mc = engine.model_config
    trunk = sum(p.numel() * p.element_size() for n, p in engine.trunk.named_parameters())
    embedding = engine.trunk.model.embed_tokens.weight
    if not mc.tie_word_embeddings:   # an untied embedding is only gathered, one row per token
        trunk -= embedding.numel() * embedding.element_size()
    bank = engine.transport.bank
    experts = bank.nbytes_per_expert() * mc.top_k
    return trunk + experts


def _random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(count)]


def ours_decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Aggregate generated tokens/s over the whole run (prefill included), all prompts together."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / elapsed


def ours_batch1_decode(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one request, from its first token to its last."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(prompt, params)
    times = []
    while engine.has_unfinished():
        engine.step()
        times.append(time.perf_counter())
    return (new_tokens - 1) / (times[-1] - times[0])


def ours_prefill(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return len(prompt) / (time.perf_counter() - start)


def hf_generate_time(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    _sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync()
    return time.perf_counter() - start


def main(model: str = "smollm2-moe", dtype: str = "auto", quick: bool = False) -> int:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    new_tokens = 16 if quick else 64
    engine = Engine(model, EngineConfig(dtype=dtype, max_num_batched_tokens=1024, max_num_seqs=128,
                                        enable_prefix_caching=False, skip_tokenizer_init=True))
    vocab = engine.model_config.vocab_size
    ref = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(engine.device).eval()
    print(f"model {engine.model_dir.name} ({engine.model_config.model_type}), dtype {engine.dtype}, "
          f"device {engine.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    short = _random_prompts(1, 16, vocab, seed=1)[0]
    # Warm up both (first calls allocate and pick kernels).
    ours_batch1_decode(engine, short, 4)
    hf_generate_time(ref, [short], 4)

    rows = []
    ours_b1 = ours_batch1_decode(engine, short, new_tokens)
    hf_b1 = (new_tokens - 1) / (hf_generate_time(ref, [short], new_tokens) - hf_generate_time(ref, [short], 1))
    rows.append(("batch-1 decode tokens/s", ours_b1, hf_b1))

    long_prompt = _random_prompts(1, 512, vocab, seed=2)[0]
    ours_pf = max(ours_prefill(engine, p) for p in _random_prompts(2, 512, vocab, seed=3))
    hf_pf = 512 / min(hf_generate_time(ref, [long_prompt], 1) for _ in range(2))
    rows.append(("prefill tokens/s (512-token prompt)", ours_pf, hf_pf))

    hf_b16 = 16 * new_tokens / hf_generate_time(ref, _random_prompts(16, 32, vocab, seed=4), new_tokens)
    for concurrency in (16, 64):
        rate = ours_decode_rate(engine, _random_prompts(concurrency, 32, vocab, seed=5 + concurrency), new_tokens)
        rows.append((f"{concurrency} concurrent, aggregate tokens/s (vs transformers static batch 16)", rate, hf_b16))

    bandwidth = measure_bandwidth()
    weight_bytes = active_weight_bytes(engine)
    roofline = bandwidth / weight_bytes

    print(f"\n| measure | expertmesh | transformers | ratio |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    print(f"\nbatch-1 roofline: {weight_bytes / 2**20:.0f} MiB of active weights per token, "
          f"measured read bandwidth {bandwidth / 2**30:.1f} GiB/s -> {roofline:.1f} tokens/s; "
          f"expertmesh batch-1 decode is {ours_b1 / roofline:.0%} of the roofline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
