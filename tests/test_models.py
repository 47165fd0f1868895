"""Each model family against transformers, on tiny random checkpoints that
transformers itself wrote: prefill logits, and greedy tokens for one prompt, a
batch of prompts of different lengths, and a prompt longer than the sliding window."""
from __future__ import annotations

import pytest
import torch

from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import tiny_checkpoints

LOGITS_ATOL = 1e-4   # float32 end to end; differences come from summation order only
NEW_TOKENS = 32


def engine_for(path, **overrides) -> Engine:
    # A small budget and blocks force chunked prefill and many blocks per sequence.
    settings = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=512,
                    max_num_batched_tokens=24, skip_tokenizer_init=True)
    settings.update(overrides)
    return Engine(path, EngineConfig(**settings))


def reference_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tiny_checkpoints.VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=sorted(tiny_checkpoints.FAMILIES))
def family(request, tmp_path_factory):
    path, model = tiny_checkpoints.FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path, model


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def test_prefill_logits_match_transformers(family):
    _, path, model = family
    engine = engine_for(path)
    prompt = prompts([40])[0]
    ours = engine.prompt_logits(prompt)
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=LOGITS_ATOL, rtol=1e-4)


def test_single_prompt_greedy_equals_transformers(family):
    _, path, model = family
    engine = engine_for(path)
    prompt = prompts([11])[0]
    [result] = engine.generate([prompt], GREEDY)
    assert result.token_ids == reference_greedy(model, prompt)
    assert result.finish_reason == "length"


def test_batch_of_different_lengths_equals_transformers(family):
    _, path, model = family
    engine = engine_for(path)
    batch = prompts([3, 17, 9, 30, 1])
    results = engine.generate(batch, GREEDY)
    for prompt, result in zip(batch, results):
        assert result.token_ids == reference_greedy(model, prompt), f"prompt of {len(prompt)} tokens differs"


def test_prompt_longer_than_sliding_window(family, tmp_path):
    name, _, _ = family
    # gpt_oss already alternates an 8-token window with full attention; give the others a window too.
    overrides = {"mixtral": {"sliding_window": 8},
                 "qwen3_moe": {"sliding_window": 8, "use_sliding_window": True},
                 "gpt_oss": {}}[name]
    path, model = tiny_checkpoints.FAMILIES[name](tmp_path / name, seed=3, **overrides)
    engine = engine_for(path)
    assert any(w == 8 for w in engine.model_config.layer_windows)
    batch = prompts([45, 20], seed=5)   # the first prompt is several windows long; decoding walks past it
    results = engine.generate(batch, GREEDY)
    for prompt, result in zip(batch, results):
        assert result.token_ids == reference_greedy(model, prompt)


def test_prefix_cache_reuses_blocks_and_keeps_the_answer(family):
    _, path, model = family
    engine = engine_for(path)
    shared = prompts([24], seed=7)[0]
    first = shared + [5, 6, 7]
    second = shared + [9, 10]
    [a] = engine.generate([first], GREEDY)
    [b] = engine.generate([second], GREEDY)
    assert a.cached_tokens == 0
    assert b.cached_tokens == 24                  # six full 4-token blocks of the shared prefix
    assert engine.prefix_cache_stats.hits == 24
    assert b.token_ids == reference_greedy(model, second)


def test_preemption_by_recompute_keeps_the_answer(family):
    _, path, model = family
    # 24 blocks of 4 tokens cannot hold four sequences of ~60 tokens at once.
    engine = engine_for(path, num_kv_blocks=24, max_model_len=96, enable_prefix_caching=False)
    batch = prompts([30, 28, 26, 25], seed=11)
    results = engine.generate(batch, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    for prompt, result in zip(batch, results):
        assert result.token_ids == reference_greedy(model, prompt)
