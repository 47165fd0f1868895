"""The engine on a GPU against transformers on the same GPU. Skipped where there is no CUDA device.

Run on a GPU machine with `pytest tests/gpu`.
"""
from __future__ import annotations

import pytest
import torch

from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import tiny_checkpoints

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=sorted(tiny_checkpoints.FAMILIES))
def family(request, tmp_path_factory):
    path, model = tiny_checkpoints.FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path, model


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tiny_checkpoints.VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_float32_greedy_equals_transformers_on_cuda(family):
    _, path, model = family
    model = model.to("cuda")
    engine = Engine(path, EngineConfig(device="cuda", dtype="float32", block_size=16, num_kv_blocks=256,
                                       skip_tokenizer_init=True))
    batch = _prompts([5, 40, 17])
    results = engine.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for prompt, result in zip(batch, results):
        ids = torch.tensor([prompt], device="cuda")
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False)
        assert result.token_ids == reference[0, len(prompt):].tolist()


def test_bfloat16_prefill_logits_close_to_transformers(family):
    _, path, model = family
    model = model.to("cuda", torch.bfloat16)
    engine = Engine(path, EngineConfig(device="cuda", block_size=16, num_kv_blocks=256, skip_tokenizer_init=True))
    assert engine.dtype == torch.bfloat16                 # the GPU default
    prompt = _prompts([48], seed=2)[0]
    ours = engine.prompt_logits(prompt)
    with torch.no_grad():
        reference = model(torch.tensor([prompt], device="cuda")).logits[0].float()
    # bf16 keeps 8 bits of mantissa; logits of this size differ in the second decimal at most.
    torch.testing.assert_close(ours, reference, atol=0.1, rtol=0.05)
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree > 0.9
