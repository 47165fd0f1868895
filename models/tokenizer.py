"""Tokenizer of a checkpoint: text <-> token ids, and chat templates rendered as transformers renders them.

A checkpoint with a `tokenizer.json` is served by the `tokenizers` library, with the special tokens,
chat template and end-of-sequence ids of `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json` and `config.json`, behaving as transformers' `AutoTokenizer` does. A gpt-oss
or Qwen3-MoE checkpoint without tokenizer files falls back to the encodings bundled in `quicktok`
(`o200k_harmony`, `qwen3`); gpt-oss without a chat template renders the harmony format through
`models.harmony`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models import harmony

# The named special tokens transformers passes to chat templates (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# model_type -> (quicktok encoding, end-of-sequence tokens, tokens decode() keeps with skip_special_tokens).
# The eos tokens are those of the models' generation_config.json; Qwen3's tool and think markers are
# added tokens that its tokenizer does not mark special.
_BUNDLED = {
    "gpt_oss": ("o200k_harmony", ("<|return|>", "<|endoftext|>", "<|call|>"), frozenset()),
    "qwen3_moe": ("qwen3", ("<|im_end|>", "<|endoftext|>"), frozenset({
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    })),
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


@lru_cache
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox transformers uses (chat_template_utils)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _alias_reasoning(message: dict) -> dict:
    """Offer a message's reasoning under every name templates read it by, as transformers does."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                      if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _HFBackend:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json. Its post-processor decides whether encode()
    adds BOS/EOS: transformers 5 keeps that post-processor and ignores tokenizer_config.json's
    `add_bos_token` / `add_eos_token` for tokenizer.json checkpoints, and so does this."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.tok = RustTokenizer.from_file(str(path))
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def to_json(self) -> str | None:
        return self.tok.to_str()

    def all_special_ids(self) -> frozenset[int]:
        return self.special_ids

    def token_bytes(self) -> list[bytes]:
        raise NotImplementedError("a tokenizer.json vocabulary is read through to_json()")


class _QuicktokBackend:
    """An encoding bundled with quicktok; special-token strings in the text encode as their ids."""

    def __init__(self, encoding: str, kept_tokens: frozenset[str]):
        import quicktok

        self.enc = quicktok.get_encoding(encoding)
        self.special_ids = frozenset(self.enc.encode_single_token(t) for t in self.enc.special_tokens_set
                                     if t not in kept_tokens)
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.enc.encode_with_special(text)

    def to_json(self) -> str | None:
        return None

    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self.enc.encode_single_token(t) for t in self.enc.special_tokens_set)

    def token_bytes(self) -> list[bytes]:
        def one(i: int) -> bytes:
            try:
                return self.enc.decode_single_token_bytes(i)
            except (KeyError, ValueError):      # an unused id inside the vocabulary's range
                return b""
        return [one(i) for i in range(self.vocab_size)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.enc.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        try:
            return self.enc.encode_single_token(token)
        except KeyError:
            return None


class Tokenizer:
    """Encode, decode and chat-template a checkpoint's text. Build it with `Tokenizer.from_pretrained`."""

    def __init__(self, backend: _HFBackend | _QuicktokBackend, *, model_type: str, config: dict,
                 chat_template: str | dict[str, str] | None, eos_token_ids: list[int]):
        self._backend = backend
        self.model_type = model_type
        self.chat_template = chat_template
        self.special_tokens_map = {name: tok for name in SPECIAL_TOKEN_NAMES
                                   if (tok := _token_str(config.get(name))) is not None}
        bos = self.special_tokens_map.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos is not None else None
        eos = self.special_tokens_map.get("eos_token")
        if eos is not None and (eos_id := backend.token_to_id(eos)) is not None:
            eos_token_ids = [*eos_token_ids, eos_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.vocab_size: int = backend.vocab_size
        # The ids decode(skip_special_tokens=True) drops.
        self.all_special_ids: frozenset[int] = backend.special_ids

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, model_type: str) -> "Tokenizer":
        """Load the tokenizer of the checkpoint in `model_dir` (see the module docstring)."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        eos_ids = _ids(_read_json(model_dir / "generation_config.json").get("eos_token_id")) \
            + _ids(_read_json(model_dir / "config.json").get("eos_token_id"))
        if (model_dir / "tokenizer.json").is_file():
            backend = _HFBackend(model_dir / "tokenizer.json")
        elif model_type in _BUNDLED:
            encoding, eos_tokens, kept = _BUNDLED[model_type]
            backend = _QuicktokBackend(encoding, kept)
            if not eos_ids:
                eos_ids = [backend.token_to_id(t) for t in eos_tokens]
        else:
            raise ValueError(f"{model_dir}: tokenizer.json is missing, and there is no bundled tokenizer "
                             f"for model type {model_type!r}")
        return cls(backend, model_type=model_type, config=config,
                   chat_template=cls._load_chat_template(model_dir, config), eos_token_ids=eos_ids)

    @staticmethod
    def _load_chat_template(model_dir: Path, config: dict) -> str | dict[str, str] | None:
        """The chat template(s): chat_template.jinja (transformers 5) or tokenizer_config.json's field."""
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        template = config.get("chat_template") or _read_json(model_dir / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            return {t["name"]: t["template"] for t in template}
        return template

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the BOS/EOS that tokenizer.json's post-processor
        adds (the bundled encodings add none). Special-token strings in the text encode as their ids."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a single token (a special token's text), or None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    # ------------------------------------------------------------------ the vocabulary, for constrained decoding

    def tokenizer_json(self) -> str | None:
        """The serialized tokenizer.json, or None for a bundled encoding (then use `token_bytes`)."""
        return self._backend.to_json()

    def token_bytes(self) -> list[bytes]:
        """Every token's bytes, by id (bundled encodings only)."""
        return self._backend.token_bytes()

    def all_special_token_ids(self) -> frozenset[int]:
        """Every control token, including those decode() keeps (Qwen3's <think>, <tool_call>)."""
        return self._backend.all_special_ids()

    # ------------------------------------------------------------------ chat

    def _template_source(self, tools: list | None) -> str | None:
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" not in template:
                raise ValueError(f"the chat templates have no default; names: {sorted(template)}")
            return template["default"]
        return template

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render `messages` (OpenAI-style dicts) with the checkpoint's chat template, exactly as
        transformers' `apply_chat_template(tokenize=False)`; extra `kwargs` are template variables
        (e.g. `reasoning_effort`, `enable_thinking`). gpt-oss without a template renders harmony."""
        source = self._template_source(tools)
        if source is None:
            if self.model_type == "gpt_oss":
                return harmony.render_conversation(messages, add_generation_prompt=add_generation_prompt,
                                                   tools=tools, **kwargs)
            raise ValueError(f"this {self.model_type} tokenizer has no chat template "
                             "(no chat_template.jinja and none in tokenizer_config.json)")
        # transformers drops None-valued keys (OpenAI clients send content=None beside tool calls).
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        return _compile_template(source).render(
            messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs})

    def encode_chat(self, messages: list[dict], **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat; the template writes its own BOS, so none is added."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)
