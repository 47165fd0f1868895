"""The engine as a caller sees it: aborts, streaming through AsyncEngine, seeds, logprobs
against transformers' logits, and clear errors for requests it cannot run."""
from __future__ import annotations

import asyncio

import pytest
import torch

from router.async_engine import AsyncEngine
from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import tiny_checkpoints

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoints.mixtral(tmp_path_factory.mktemp("mixtral"), seed=4)


def make_engine(path, **overrides) -> Engine:
    settings = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=256,
                    max_num_batched_tokens=32, max_model_len=128, skip_tokenizer_init=True)
    settings.update(overrides)
    return Engine(path, EngineConfig(**settings))


def prompt(n, seed=0):
    return torch.randint(0, tiny_checkpoints.VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_abort_mid_generation_frees_its_blocks_and_spares_the_others(checkpoint):
    path, model = checkpoint
    engine = make_engine(path, enable_prefix_caching=False)
    free_before = engine.block_manager.num_free_blocks
    keep = engine.add_request(prompt(10, 1), GREEDY)
    drop = engine.add_request(prompt(12, 2), GREEDY)
    streamed = {keep: [], drop: []}
    for _ in range(5):
        for out in engine.step():
            streamed[out.request_id] += out.token_ids
    aborted = engine.abort(drop)
    assert aborted.finish_reason == "abort"
    assert engine.abort(drop) is None               # already gone
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
            streamed[keep] += out.token_ids
    assert engine.block_manager.num_free_blocks == free_before
    reference = model.generate(torch.tensor([prompt(10, 1)]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert streamed[keep] == reference[0, 10:].tolist()


def test_abort_before_the_first_step(checkpoint):
    engine = make_engine(checkpoint[0])
    rid = engine.add_request(prompt(5), GREEDY)
    assert engine.abort(rid).finish_reason == "abort"
    assert not engine.has_unfinished()


async def test_async_streaming_equals_generate_and_early_exit_aborts(checkpoint):
    path, _ = checkpoint
    expected = [r.token_ids for r in make_engine(path).generate([prompt(9, 3), prompt(14, 4)], GREEDY)]
    engine = make_engine(path)
    async_engine = AsyncEngine(engine)
    try:
        async def collect(p):
            tokens, finish = [], None
            async for out in async_engine.generate(p, GREEDY):
                tokens += out.token_ids
                finish = out.finish_reason
            return tokens, finish

        async def leave_early(p):
            async for out in async_engine.generate(p, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                                                   request_id="leaver"):
                break

        results = await asyncio.gather(collect(prompt(9, 3)), collect(prompt(14, 4)), leave_early(prompt(7, 5)))
        assert [r[0] for r in results[:2]] == expected
        assert all(r[1] == "length" for r in results[:2])
        for _ in range(100):                      # the abort is applied by the engine thread
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert "leaver" not in engine.requests and not engine.has_unfinished()

        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in async_engine.generate([tiny_checkpoints.VOCAB + 1], GREEDY):
                pass
    finally:
        async_engine.shutdown()


def test_seeded_sampling_is_reproducible_in_any_batch(checkpoint):
    path, _ = checkpoint
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    [alone] = make_engine(path).generate([prompt(8, 6)], seeded)
    crowd = make_engine(path).generate(
        [prompt(20, 7), prompt(8, 6), prompt(3, 8)],
        [SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True), seeded,
         SamplingParams(max_tokens=5, temperature=1.0, seed=1, ignore_eos=True)])
    assert crowd[1].token_ids == alone.token_ids
    [other_seed] = make_engine(path).generate([prompt(8, 6)], SamplingParams(max_tokens=16, seed=43, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_logprobs_equal_transformers_log_softmax(checkpoint):
    path, model = checkpoint
    p = prompt(12, 9)
    [result] = make_engine(path).generate([p], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))
    full = torch.tensor([p + result.token_ids])
    with torch.no_grad():
        reference = model(full).logits[0, len(p) - 1:-1].float().log_softmax(-1)   # [6, V]
    for step, item in enumerate(result.logprobs):
        assert item.logprob.logprob == pytest.approx(reference[step, item.token_id].item(), abs=1e-4)
        top = reference[step].topk(3)
        assert [t.token_id for t in item.top_logprobs] == top.indices.tolist()


def test_eos_and_stop_token_ids_end_the_request(checkpoint):
    path, _ = checkpoint
    engine = make_engine(path)
    p = prompt(10, 10)
    [free] = engine.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    [stopped] = engine.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]


@pytest.mark.parametrize("bad,message", [
    ([], "empty"),
    ([3, 999], "outside the vocabulary"),
    (list(range(100)) * 2, "exceed the model's context"),
])
def test_requests_the_engine_cannot_run_are_rejected_clearly(checkpoint, bad, message):
    engine = make_engine(checkpoint[0])
    with pytest.raises(ValueError, match=message):
        engine.add_request(bad, GREEDY)
    assert not engine.has_unfinished()


def test_stop_strings_need_a_tokenizer(checkpoint):
    engine = make_engine(checkpoint[0])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request(prompt(4), SamplingParams(stop=("x",)))


def test_bad_engine_config_is_rejected(checkpoint):
    with pytest.raises(ValueError, match="dtype"):
        make_engine(checkpoint[0], dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(checkpoint[0], max_model_len=10_000)
