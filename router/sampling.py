"""The sampler: from a batch of logits to one token per request.

Semantics follow vLLM and transformers, in this order for each row:

    allowed-token mask (constrained decoding)  ->  min_tokens (ban EOS / stop ids)
    -> repetition penalty (prompt + output)    ->  frequency & presence penalties (output)
    -> greedy: argmax  |  sampled: / temperature -> top_k -> top_p -> min_p -> draw

Logprobs are taken from the raw model logits, before any of the above, as vLLM v1
returns them by default.

Everything is a tensor op over the rows that need it; only the final random draw
loops over rows, because each seeded request draws from its own generator. That
is what makes a seeded request's tokens independent of whatever else is in the
batch: its noise comes from its own stream, and every other step is row-wise.

Legend: B = rows in the batch, V = vocabulary, N = token ids gathered over rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_LOGPROBS = 20
# Below this temperature, dividing the logits overflows float32; vLLM treats it as greedy too.
GREEDY_TEMPERATURE = 1e-5


# -- parameters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 or -1 = disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None     # None = off; 0 = chosen token only; k = also the top k (at most 20)
    include_stop_str_in_output: bool = False
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the logits before sampling.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Output decoding and constraints, set by the ingress (see router/constraints.py).
    skip_special_tokens: bool = True    # False keeps control tokens in the text (harmony's <|channel|>, ...)
    grammar: str | None = None          # an llguidance grammar the output must follow

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1, allowed=">= 1")
        _check_real("temperature", self.temperature, lambda t: t >= 0, ">= 0 (0 = greedy)")
        _check_real("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k, low=-1, allowed=">= 1, or 0 / -1 to disable")
        _check_real("min_p", self.min_p, lambda p: 0 <= p <= 1, "in [0, 1]")
        if self.seed is not None:
            _check_int("seed", self.seed, allowed="an integer or None")
        _check_real("presence_penalty", self.presence_penalty, lambda x: -2 <= x <= 2, "in [-2, 2]")
        _check_real("frequency_penalty", self.frequency_penalty, lambda x: -2 <= x <= 2, "in [-2, 2]")
        _check_real("repetition_penalty", self.repetition_penalty, lambda x: x > 0, "> 0 (1 = off)")
        _check_int("min_tokens", self.min_tokens, low=0, allowed=">= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS,
                       allowed=f"None or in [0, {MAX_LOGPROBS}]")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be an llguidance grammar string or None, got {type(self.grammar).__name__}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        # Requests arrive as JSON: lists become tuples (hashable, immutable), a lone string a 1-tuple.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)
        stop_token_ids = tuple(self.stop_token_ids or ())
        for t in stop_token_ids:
            _check_int("stop_token_ids", t, low=0, allowed="token ids >= 0")
        object.__setattr__(self, "stop_token_ids", stop_token_ids)
        items = self.logit_bias.items() if isinstance(self.logit_bias, dict) else tuple(self.logit_bias or ())
        bias = []
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"logit_bias must map token ids to biases, got {item!r}")
            _check_int("logit_bias token id", item[0], low=0, allowed="a token id >= 0")
            _check_real(f"logit_bias[{item[0]}]", item[1], lambda b: -100 <= b <= 100, "in [-100, 100]")
            bias.append((item[0], float(item[1])))
        object.__setattr__(self, "logit_bias", tuple(sorted(bias)))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _check_int(name: str, value, *, low: int | None = None, high: int | None = None, allowed: str) -> None:
    # bool is an int subclass, but `top_k=True` is a caller's mistake, not a 1.
    if not isinstance(value, int) or isinstance(value, bool) or \
            (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_real(name: str, value, in_range, allowed: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not in_range(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


# -- per-request state --------------------------------------------------------------------------

class SamplingState:
    """What the sampler needs to remember about one request between steps.

    The engine calls `append(token_id)` after each step. The token ids are also kept
    in a growing tensor so that penalties gather them without rebuilding from lists.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], eos_token_ids: frozenset[int],
                 *, device: torch.device | str = "cpu"):
        self.params = params
        self.output_token_ids: list[int] = []
        self.eos_token_ids = frozenset(eos_token_ids)
        # What min_tokens holds back: the tokens that would end the request.
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        self.min_tokens_banned_ids = torch.tensor(sorted(banned), dtype=torch.long)
        self.prompt_ids = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long)     # unique, [P]
        self._output_ids = torch.empty(16, dtype=torch.long)
        self._num_output_ids = 0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            # torch takes seeds in [0, 2**64); wrap like torch does for negative ones.
            self.generator.manual_seed(params.seed % 2**64)

    def append(self, token_id: int) -> None:
        self.output_token_ids.append(int(token_id))

    @property
    def needs_min_tokens_ban(self) -> bool:
        return len(self.output_token_ids) < self.params.min_tokens and self.min_tokens_banned_ids.numel() > 0

    def output_ids_tensor(self) -> torch.Tensor:
        """The output token ids as a tensor [O] (a view: copy before keeping it)."""
        n = len(self.output_token_ids)
        if n < self._num_output_ids:            # the engine rolled the list back: resync all of it
            self._num_output_ids = 0
        if n > self._output_ids.numel():
            grown = torch.empty(max(n, 2 * self._output_ids.numel()), dtype=torch.long)
            grown[: self._num_output_ids] = self._output_ids[: self._num_output_ids]
            self._output_ids = grown
        if n > self._num_output_ids:
            new = self.output_token_ids[self._num_output_ids:]
            self._output_ids[self._num_output_ids: n] = torch.tensor(new, dtype=torch.long)
            self._num_output_ids = n
        return self._output_ids[:n]


# -- results ------------------------------------------------------------------------------------

@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int               # 1-based: 1 + the number of tokens with a strictly higher raw logprob


@dataclass
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None                # None unless params.logprobs is set
    top_logprobs: list[TokenLogprob]            # sorted by logprob, highest first; params.logprobs long


# -- pure functions, one per processing step -------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers / vLLM: for seen tokens, divide positive logits by the penalty, multiply negative ones.

    logits [B, V], seen [B, V] bool, penalty [B]."""
    penalty = penalty[:, None]                                                  # [B, 1]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)    # [B, V]
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalties(logits: torch.Tensor, counts: torch.Tensor,
                                       frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """OpenAI: logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty.

    logits [B, V], counts [B, V] (occurrences in the output), frequency / presence [B]."""
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep the top_k largest logits (ties at the k-th value kept), then the smallest set of the
    largest whose probability reaches top_p (the largest always kept), as transformers' TopK
    and TopP warpers do, with one sort for both.

    logits [B, V]; top_k [B] long in [1, V] (V = off) or None; top_p [B] float (1 = off) or None."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=False)           # [B, V] ascending
    vocab = logits.shape[-1]
    if top_k is not None:
        kth_largest = sorted_logits.gather(-1, (vocab - top_k)[:, None])        # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, -math.inf)
    if top_p is not None:
        # Cumulative probability from the smallest up, summed in the same order as transformers.
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)               # [B, V]
        drop = cumulative <= (1 - top_p)[:, None]
        drop[:, -1] = False
        drop &= (top_p < 1)[:, None]            # a row with top_p = 1 keeps even zero-probability tokens
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (transformers' MinP).

    logits [B, V], min_p [B]."""
    probs = logits.softmax(dim=-1)                                              # [B, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]               # [B, 1]
    return logits.masked_fill(probs < threshold, -math.inf)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row by the exponential race: argmax(p / E) with E ~ Exp(1) picks token j with
    probability p[j]. Seeded rows take their noise from their own generator; the others share the
    default one. probs [B, V] -> token ids [B]."""
    noise = torch.empty_like(probs)                                             # [B, V]
    shared_rows = [i for i, g in enumerate(generators) if g is None]
    if len(shared_rows) == len(generators):
        noise.exponential_()
    else:
        if shared_rows:
            noise[shared_rows] = torch.empty(len(shared_rows), probs.shape[-1], device=probs.device).exponential_()
        for i, generator in enumerate(generators):
            if generator is None:
                continue
            # A generator lives on one device; draw there so the stream is the request's own.
            row_noise = torch.empty(probs.shape[-1], device=generator.device).exponential_(generator=generator)
            noise[i] = row_noise.to(probs.device)
    # Exp(1) can round to 0, and 0 / 0 is NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


# -- the sampler ----------------------------------------------------------------------------------

class Sampler:
    """Batched sampling over [B, V] logits, one `SamplingState` per row.

    `vocab_size` is the number of real tokens: logits columns beyond it (an lm_head padded
    to a multiple of 64, say) are never sampled and do not count in logprobs.
    """

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def sample(self, logits: torch.Tensor, states: list[SamplingState],
               allowed_masks: list[torch.Tensor | None] | torch.Tensor | None = None) -> list[SampleResult]:
        """logits [B, V] (any float dtype, any device); row i belongs to states[i].
        allowed_masks: per row a bool [V] tensor (True = may be sampled) or None, or one [B, V] tensor."""
        logits = self._real_vocab(logits, states)
        if self._plain_greedy(states, allowed_masks):
            token_ids = logits.argmax(dim=-1)                                   # [B]
        else:
            processed = self.processed_logits(logits, states, allowed_masks)   # [B, V] float32
            token_ids = self._choose(processed, states)                         # [B]
        return self._results(logits, token_ids, states)

    def processed_logits(self, logits: torch.Tensor, states: list[SamplingState],
                         allowed_masks: list[torch.Tensor | None] | torch.Tensor | None = None) -> torch.Tensor:
        """The float32 logits [B, V] each row's token is chosen from: after the mask, min_tokens and
        penalties, and for sampled rows also temperature, top_k, top_p and min_p (greedy rows stop
        before temperature: their argmax is the same either way). -inf marks what cannot be drawn."""
        logits = self._real_vocab(logits, states).float().clone()              # [B, V]
        self._apply_allowed_masks(logits, allowed_masks)
        self._apply_min_tokens(logits, states)
        self._apply_penalties(logits, states)
        self._apply_logit_bias(logits, states)

        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled_rows:
            rows = _row_index(sampled_rows, len(states), logits.device)
            params = [states[i].params for i in sampled_rows]
            subset = logits if rows is None else logits[rows]                   # [S, V]
            logits_out = self._warp(subset, params)
            if rows is None:
                logits = logits_out
            else:
                logits[rows] = logits_out
        return logits

    # -- steps --

    def _real_vocab(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [B, V] with B = {len(states)} states, got {tuple(logits.shape)}")
        if self.vocab_size is None or logits.shape[1] == self.vocab_size:
            return logits
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than the vocabulary's {self.vocab_size}")
        return logits[:, : self.vocab_size]

    @staticmethod
    def _plain_greedy(states: list[SamplingState], allowed_masks) -> bool:
        """Greedy rows with nothing to change the argmax: one argmax over the raw logits suffices."""
        if allowed_masks is not None and (isinstance(allowed_masks, torch.Tensor)
                                          or any(m is not None for m in allowed_masks)):
            return False
        return all(s.params.greedy and not _has_penalties(s.params) and not s.needs_min_tokens_ban
                   and not s.params.logit_bias for s in states)

    @staticmethod
    def _apply_allowed_masks(logits: torch.Tensor, allowed_masks) -> None:
        if allowed_masks is None:
            return
        batch, vocab = logits.shape
        if isinstance(allowed_masks, torch.Tensor):
            masks = allowed_masks.to(logits.device, torch.bool)
            if masks.shape[0] != batch:
                raise ValueError(f"allowed_masks has {masks.shape[0]} rows for a batch of {batch}")
            rows = list(range(batch))
        else:
            if len(allowed_masks) != batch:
                raise ValueError(f"allowed_masks has {len(allowed_masks)} entries for a batch of {batch}")
            rows = [i for i, m in enumerate(allowed_masks) if m is not None]
            if not rows:
                return
            masks = torch.stack([_fit_mask(allowed_masks[i].to(logits.device), vocab) for i in rows])
        masks = _fit_mask(masks, vocab)                                         # [R, V]
        empty = (~masks.any(dim=-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"allowed_masks allow no token at all in rows {[rows[i] for i in empty]}")
        row_ids = torch.tensor(rows, device=logits.device)
        logits[row_ids] = logits[row_ids].masked_fill(~masks, -math.inf)

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
        rows = [i for i, s in enumerate(states) if s.needs_min_tokens_ban]
        if not rows:
            return
        vocab = logits.shape[1]
        row_ids, token_ids = _gather_ids([states[i].min_tokens_banned_ids for i in rows], rows, vocab)
        row_ids, token_ids = row_ids.to(logits.device), token_ids.to(logits.device)
        before = logits[row_ids, token_ids]
        logits[row_ids, token_ids] = -math.inf
        # If the constraint left nothing but the stop tokens, the constraint wins: the grammar has ended.
        rows_t = torch.tensor(rows, device=logits.device)
        dead = ~torch.isfinite(logits[rows_t]).any(dim=-1)                      # [R]
        if dead.any():
            restore = dead[torch.searchsorted(rows_t, row_ids)]
            logits[row_ids[restore], token_ids[restore]] = before[restore]

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
        vocab, device = logits.shape[1], logits.device

        rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
        if rows:
            ids = [torch.cat([states[i].prompt_ids, states[i].output_ids_tensor()]) for i in rows]
            row_ids, token_ids = _gather_ids(ids, range(len(rows)), vocab)
            seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)     # [R, V]
            seen[row_ids.to(device), token_ids.to(device)] = True
            penalty = torch.tensor([states[i].params.repetition_penalty for i in rows], device=device)
            rows_t = torch.tensor(rows, device=device)
            logits[rows_t] = apply_repetition_penalty(logits[rows_t], seen, penalty)

        rows = [i for i, s in enumerate(states)
                if (s.params.frequency_penalty or s.params.presence_penalty) and s.output_token_ids]
        if rows:
            row_ids, token_ids = _gather_ids([states[i].output_ids_tensor() for i in rows], range(len(rows)), vocab)
            counts = torch.zeros(len(rows), vocab, device=device)                        # [R, V]
            counts.index_put_((row_ids.to(device), token_ids.to(device)),
                              torch.ones(row_ids.numel(), device=device), accumulate=True)
            frequency = torch.tensor([states[i].params.frequency_penalty for i in rows], device=device)
            presence = torch.tensor([states[i].params.presence_penalty for i in rows], device=device)
            rows_t = torch.tensor(rows, device=device)
            logits[rows_t] = apply_frequency_presence_penalties(logits[rows_t], counts, frequency, presence)

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
        """Add each request's logit_bias to its row (a token the mask or min_tokens removed stays out)."""
        rows = [i for i, s in enumerate(states) if s.params.logit_bias]
        if not rows:
            return
        vocab = logits.shape[1]
        row_ids, token_ids, biases = [], [], []
        for i in rows:
            for token_id, bias in states[i].params.logit_bias:
                if token_id >= vocab:
                    raise ValueError(f"logit_bias names token {token_id}, outside the vocabulary of {vocab}")
                row_ids.append(i)
                token_ids.append(token_id)
                biases.append(bias)
        device = logits.device
        logits.index_put_((torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)),
                          torch.tensor(biases, device=device), accumulate=True)

    @staticmethod
    def _warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top_k, top_p, min_p over rows that sample. logits [S, V] -> [S, V]."""
        device, vocab = logits.device, logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        top_k = top_p = None
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
        if any(p.top_p < 1 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device)
        if top_k is not None or top_p is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
        return logits

    @staticmethod
    def _choose(processed: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        token_ids = processed.argmax(dim=-1)                                    # [B], right for greedy rows
        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled_rows:
            rows = _row_index(sampled_rows, len(states), processed.device)
            probs = (processed if rows is None else processed[rows]).softmax(dim=-1)   # [S, V]
            drawn = draw(probs, [states[i].generator for i in sampled_rows])
            if rows is None:
                token_ids = drawn
            else:
                token_ids[rows] = drawn
        return token_ids

    @staticmethod
    def _results(logits: torch.Tensor, token_ids: torch.Tensor, states: list[SamplingState]) -> list[SampleResult]:
        chosen = token_ids.tolist()
        results = [SampleResult(t, None, []) for t in chosen]
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not rows:
            return results
        rows_t = torch.tensor(rows, device=logits.device)
        logprobs = logits[rows_t].float().log_softmax(dim=-1)                    # [R, V] raw distribution
        chosen_logprob = logprobs.gather(-1, token_ids[rows_t][:, None])         # [R, 1]
        chosen_rank = (logprobs > chosen_logprob).sum(dim=-1) + 1                # [R]
        k = max(states[i].params.logprobs for i in rows)
        if k:
            top_values, top_ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)     # [R, k], sorted
            # Rank within the top list: everything more likely than an entry sits before it.
            top_ranks = (top_values[:, None, :] > top_values[:, :, None]).sum(dim=-1) + 1  # [R, k]
            top = list(zip(top_ids.tolist(), top_values.tolist(), top_ranks.tolist()))
        for j, (i, lp, rank) in enumerate(zip(rows, chosen_logprob.flatten().tolist(), chosen_rank.tolist())):
            results[i].logprob = TokenLogprob(chosen[i], lp, rank)
            n = states[i].params.logprobs
            if n:
                ids, values, ranks = top[j]
                results[i].top_logprobs = [TokenLogprob(t, v, r) for t, v, r in zip(ids[:n], values[:n], ranks[:n])]
        return results


# -- helpers ----------------------------------------------------------------------------------------

def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _row_index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """An index tensor for a subset of rows, or None when the subset is the whole batch (no copy)."""
    return None if len(rows) == batch else torch.tensor(rows, device=device)


def _gather_ids(ids: list[torch.Tensor], rows, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row token ids into (row, token) index pairs [N], [N], dropping ids outside
    the vocabulary (an embedding table can be larger than the lm_head; those are never sampled)."""
    lengths = torch.tensor([t.numel() for t in ids])
    token_ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), lengths)
    keep = (token_ids >= 0) & (token_ids < vocab)
    return row_ids[keep], token_ids[keep]


def _fit_mask(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """A mask for the logits' vocabulary: a tokenizer-sized mask leaves the padding columns disallowed."""
    mask = mask.to(torch.bool)
    width = mask.shape[-1]
    if width == vocab:
        return mask
    if width > vocab:
        raise ValueError(f"an allowed-token mask has {width} entries, more than the {vocab} logits")
    return torch.nn.functional.pad(mask, (0, vocab - width), value=False)
