"""Constrained decoding: an llguidance grammar per request, applied as a token mask in the sampler.

The ingress turns `response_format` and forced tool calls into a grammar (llguidance's JSON form,
from `llguidance.LLMatcher.grammar_from_*`) and sends it in `SamplingParams.grammar`. Here each
request gets an `LLMatcher` over the checkpoint's vocabulary. After a token is sampled the matcher
consumes it and the mask for the next step is computed on a worker thread (llguidance releases
the GIL), so it is ready, or nearly, when the next forward pass ends.

Legend: V = the model's vocabulary (logits columns), W = V / 32 rounded up (bitmask words).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A grammar llguidance cannot compile; the message names the problem."""


def check_grammar(grammar: str) -> None:
    """Raise GrammarError when `grammar` does not compile (no tokenizer needed)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(messages[0] if messages else "the grammar does not compile")


def lltokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a checkpoint's vocabulary (about a second to build: build it once)."""
    source = tokenizer.tokenizer_json()
    eos = list(tokenizer.eos_token_ids) or None
    if source is not None:
        return llguidance.LLTokenizer(source, n_vocab=tokenizer.vocab_size, eos_token=eos)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_BytesVocabulary(tokenizer)),
                                  n_vocab=tokenizer.vocab_size, eos_token=eos)


class _BytesVocabulary:
    """What llguidance.TokenizerWrapper reads: every token's bytes, the special ids, an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokens = tokenizer.token_bytes()
        self.special_token_ids = sorted(tokenizer.all_special_token_ids())
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


class ConstraintFactory:
    """Builds one `GrammarConstraint` per request; owns the vocabulary and the mask workers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, workers: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size                 # the logits' width; the tokenizer's may differ
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="expertmesh-mask")

    @property
    def ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = lltokenizer(self.tokenizer)
            return self._ll

    def create(self, grammar: str) -> "GrammarConstraint":
        matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the output constraint does not compile: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.ll.vocab_size, self.vocab_size, self._pool,
                                 eos_token_ids=self.tokenizer.eos_token_ids)


class GrammarConstraint:
    """One request's matcher. `allowed()` -> bool [V] for this step; `accept(token)` after sampling.

    A matcher that reaches an error state (it should not, as only allowed tokens are sampled)
    ends its request at the next step by allowing only end-of-sequence tokens, and is logged."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int, model_vocab: int,
                 pool: ThreadPoolExecutor, *, eos_token_ids=()):
        self.matcher = matcher
        self._eos = [t for t in eos_token_ids if t < min(tokenizer_vocab, model_vocab)]
        self._bitmask = allocate_token_bitmask(1, tokenizer_vocab)                 # [1, W] int32
        self._bits = torch.arange(32, dtype=torch.int32)
        self._tokenizer_vocab, self._model_vocab = tokenizer_vocab, model_vocab
        self._pool = pool
        self._next: Future | None = pool.submit(self._compute)

    def _compute(self) -> torch.Tensor:
        fill_next_token_bitmask(self.matcher, self._bitmask)
        words = self._bitmask[0]                                                     # [W]
        allowed = ((words[:, None] >> self._bits) & 1).bool().flatten()              # [32 W]
        return allowed[: min(self._tokenizer_vocab, self._model_vocab)]              # [<= V]

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next (waits for the mask the worker computes)."""
        if self._next is None:
            self._next = self._pool.submit(self._compute)
        mask, self._next = self._next.result(), None
        if not mask.any():
            log.error("output constraint at a dead end (%s); ending the request", self.matcher.get_error())
            mask[self._eos] = True
        return mask

    def accept(self, token_id: int) -> None:
        """Consume the sampled token and start computing the next mask in the background."""
        if not self.matcher.consume_token(token_id) and not self.matcher.is_stopped():
            log.error("token %d violates the output constraint: %s", token_id, self.matcher.get_error())
        self._next = self._pool.submit(self._compute)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

