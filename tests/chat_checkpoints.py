"""Tiny random checkpoints that speak a real chat format, for the serving tests.

The tiny checkpoints of tests/tiny_checkpoints.py have a 256-token vocabulary; these have the full
vocabulary of the encoding their family falls back to (quicktok's `qwen3` and `o200k_harmony`), so
that the model can emit `<think>`, `<tool_call>` or harmony's `<|channel|>` and the output parsers
see what a real checkpoint would send. Qwen3 gets a Qwen3-style chat template (thinking and tool
calls); gpt-oss has none and is rendered in harmony by models/harmony.py.
"""
from __future__ import annotations

from pathlib import Path

from tests import tiny_checkpoints

QWEN3_VOCAB = 151936            # Qwen3's embedding rows (the tokenizer uses 151669 of them)
GPT_OSS_VOCAB = 201088          # o200k_harmony
QWEN3_TEMPLATE = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"


def qwen3_moe(path: Path, *, seed: int = 0) -> Path:
    path, _ = tiny_checkpoints.qwen3_moe(path, seed=seed, vocab_size=QWEN3_VOCAB, tie_word_embeddings=True,
                                         max_position_embeddings=1024)
    (path / "chat_template.jinja").write_text(QWEN3_TEMPLATE.read_text())
    return path


def gpt_oss(path: Path, *, seed: int = 0) -> Path:
    path, _ = tiny_checkpoints.gpt_oss(path, seed=seed, vocab_size=GPT_OSS_VOCAB, tie_word_embeddings=True,
                                       max_position_embeddings=1024)
    return path
