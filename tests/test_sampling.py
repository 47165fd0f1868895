"""The sampler against transformers' own logits processors, and the properties a user relies on:
a seed reproduces a request whatever else is in the batch, and draws follow the distribution."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from router.sampling import Sampler, SamplingParams, SamplingState

V = 50


def _states(params_list, prompt=(1, 2, 3), eos=frozenset({0})):
    return [SamplingState(p, list(prompt), eos) for p in params_list]


def _finite_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, 0, 1.0, 0.0),
    (1.0, 5, 1.0, 0.0),
    (1.3, 0, 0.8, 0.0),
    (0.9, 10, 0.6, 0.0),
    (1.0, 0, 1.0, 0.1),
])
def test_warpers_match_transformers(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = Sampler(V).processed_logits(logits, _states([params] * 4))

    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    if min_p:
        ref = MinPLogitsWarper(min_p)(None, ref)
    assert torch.equal(_finite_mask(ours), _finite_mask(ref))
    torch.testing.assert_close(ours[_finite_mask(ours)], ref[_finite_mask(ref)])


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(1, V)
    prompt, output = [3, 7, 7, 11], [20, 3]
    state = SamplingState(SamplingParams(temperature=0, repetition_penalty=1.3), prompt, frozenset())
    for t in output:
        state.append(t)
    ours = Sampler(V).processed_logits(logits, [state])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_frequency_and_presence_penalties_follow_openai_formula():
    logits = torch.zeros(1, V)
    state = SamplingState(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25),
                          [9, 9, 9], frozenset())
    for t in (4, 4, 5):
        state.append(t)
    out = Sampler(V).processed_logits(logits, [state])[0]
    assert out[4].item() == pytest.approx(-(2 * 0.5 + 0.25))
    assert out[5].item() == pytest.approx(-(1 * 0.5 + 0.25))
    assert out[9].item() == 0.0          # prompt tokens are not penalized by these two


def test_greedy_is_argmax_and_logprobs_are_log_softmax_of_raw_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    params = SamplingParams(temperature=0, logprobs=3)
    results = Sampler(V).sample(logits, _states([params] * 3))
    ref = logits.log_softmax(-1)
    for row, result in enumerate(results):
        assert result.token_id == int(logits[row].argmax())
        assert result.logprob.logprob == pytest.approx(ref[row, result.token_id].item(), abs=1e-6)
        assert result.logprob.rank == 1
        top = ref[row].topk(3)
        assert [t.token_id for t in result.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in result.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_seeded_request_is_reproducible_whatever_else_is_in_the_batch():
    torch.manual_seed(3)
    logits = torch.randn(5, V)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_params, row):
        states = _states(batch_params)
        tokens = []
        for _ in range(20):
            tokens.append(Sampler(V).sample(logits[: len(states)], states)[row].token_id)
            for s, r in zip(states, range(len(states))):
                s.append(tokens[-1] if r == row else 0)
        return tokens

    logits[2] = logits[0]                # the seeded request sees the same logits in both batches
    alone = run([seeded], 0)
    crowded = run([SamplingParams(temperature=0.5), SamplingParams(temperature=0), seeded,
                   SamplingParams(temperature=1.0, seed=7)], 2)
    assert alone == crowded
    assert len(set(alone)) > 1           # it did sample, not argmax


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    n = 20000
    batch = logits.expand(n, 4)
    # One request per row, each with its own seed: n independent draws.
    states = [SamplingState(SamplingParams(temperature=1.0, seed=i), [1], frozenset()) for i in range(n)]
    tokens = torch.tensor([r.token_id for r in Sampler(4).sample(batch, states)])
    freq = torch.bincount(tokens, minlength=4).float() / n
    # 5 standard errors of a binomial proportion.
    tolerance = 5 * torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() < tolerance), (freq, probs)


def test_min_tokens_bans_eos_until_reached():
    logits = torch.full((1, V), -10.0)
    logits[0, 0] = 10.0                  # EOS is by far the most likely
    state = SamplingState(SamplingParams(temperature=0, min_tokens=2), [5], frozenset({0}))
    sampler = Sampler(V)
    first = sampler.sample(logits, [state])[0].token_id
    state.append(first)
    second = sampler.sample(logits, [state])[0].token_id
    state.append(second)
    third = sampler.sample(logits, [state])[0].token_id
    assert first != 0 and second != 0 and third == 0


def test_allowed_mask_restricts_the_choice():
    logits = torch.arange(V, dtype=torch.float32)[None]
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[3, 17]] = True
    result = Sampler(V).sample(logits, _states([SamplingParams(temperature=0)]), [mask])
    assert result[0].token_id == 17
    with pytest.raises(ValueError, match="allow no token"):
        Sampler(V).sample(logits, _states([SamplingParams(temperature=0)]), [torch.zeros(V, dtype=torch.bool)])


@pytest.mark.parametrize("field,value,message", [
    ("max_tokens", 0, "max_tokens"),
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_k", -2, "top_k"),
    ("min_p", 1.5, "min_p"),
    ("presence_penalty", 3.0, "presence_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("logprobs", 21, "logprobs"),
    ("max_tokens", 2.5, "max_tokens"),
])
def test_bad_parameters_are_rejected_with_their_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_padded_vocabulary_columns_are_never_sampled():
    logits = torch.zeros(1, V + 14)
    logits[0, V:] = 100.0                # padding columns of an lm_head rounded up
    result = Sampler(V).sample(logits, _states([SamplingParams(temperature=0, logprobs=0)]))[0]
    assert result.token_id < V
    assert result.logprob.logprob == pytest.approx(-math.log(V), abs=1e-5)


def test_logit_bias_is_added_before_sampling_like_openai():
    """+100 forces a token, -100 bans one, a bias shifts the distribution exactly by its value;
    a masked-out token stays out whatever its bias."""
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    top = int(logits[1].argmax())
    params = [SamplingParams(temperature=0, logit_bias={7: 100}),
              SamplingParams(temperature=0, logit_bias={top: -100}),
              SamplingParams(temperature=1.0, logit_bias={3: 2.5, 4: -1.0})]
    states = _states(params)
    chosen = [r.token_id for r in Sampler(V).sample(logits.clone(), states)]
    assert chosen[0] == 7
    assert chosen[1] != top and chosen[1] == int(logits[1].clone().index_fill_(0, torch.tensor([top]), -1e9).argmax())
    processed = Sampler(V).processed_logits(logits.clone(), states)
    expected = logits[2].clone()
    expected[3] += 2.5
    expected[4] -= 1.0
    assert torch.allclose(processed[2], expected)
    mask = torch.ones(V, dtype=torch.bool)
    mask[7] = False
    again = Sampler(V).sample(logits[:1].clone(), _states(params[:1]), [mask])
    assert again[0].token_id != 7


@pytest.mark.parametrize("bias", [{"x": 1}, {5: 101}, {-1: 1}, [(1, 2, 3)]])
def test_bad_logit_bias_is_a_clear_error(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)
