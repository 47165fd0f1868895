"""Helpers of the Responses API tests: what a conversation's prompt should be, counted independently
of the server's own conversion of stored items into messages."""
from __future__ import annotations

from pathlib import Path

from models.registry import load_config
from models.tokenizer import Tokenizer

# About 85 tokens: a few of these outgrow the tiny test models' 512-token context.
LONG = "Here is a long story about the river, the mill and the miller's three daughters. " * 5


def prompt_counter(checkpoint: Path):
    """count(messages, tools=None): the tokens of the prompt a chat request with these messages
    renders with the checkpoint's template (thinking off, as `reasoning: {effort: none}` asks)."""
    _, model_config = load_config(checkpoint)
    tokenizer = Tokenizer.from_pretrained(checkpoint, model_config.model_type)

    def count(messages: list[dict], tools: list[dict] | None = None) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools,
                                             enable_thinking=False)
        return len(tokenizer.encode(text, add_special_tokens=False))
    return count
