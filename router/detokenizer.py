"""Streaming detokenization: turn output tokens into text as they arrive.

A token does not always map to text on its own: byte-level BPE splits multibyte characters across
tokens, and sentencepiece-style tokenizers drop the leading space of the first token they decode. So,
like vLLM's `detokenize_incrementally`, each step decodes a short window of earlier output tokens plus
the new ones and emits the part past the window's own text, and text ending in an incomplete UTF-8
character (U+FFFD) is held back until the character completes.

The emitted text adds up to `tokenizer.decode(output_ids)`: the windows start at the first output
token, so the output is decoded on its own, never glued to the prompt.
"""
from __future__ import annotations

from models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Detokenize one request's output. `step(ids)` returns the new text, `flush()` what was held back
    at the end, and `text` is all output text so far."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        # `prompt_ids` belongs to the engine's interface; the output text is decoded without the prompt.
        del prompt_ids
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self._prefix_offset = 0               # window start: a character boundary already emitted past
        self._read_offset = 0                 # tokens before this are emitted
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.output_ids[start:stop], skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> str:
        """Text of the tokens past the read offset, decoded in the context of the window."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def step(self, new_ids: list[int]) -> str:
        """Append `new_ids` and return the text they complete (possibly empty)."""
        self.output_ids.extend(new_ids)
        delta = self._pending()
        if not delta or delta.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.output_ids)
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """The held-back text (an incomplete character decodes as U+FFFD), at the end of the output."""
        delta = self._pending()
        self._prefix_offset = self._read_offset = len(self.output_ids)
        if delta:
            self._chunks.append(delta)
        return delta
