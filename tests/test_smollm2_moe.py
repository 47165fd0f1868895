"""smollm2-moe: the SmolLM2 GGUF upcycled into a Mixtral checkpoint, checked against transformers' own reading
of the same GGUF (its config parser, dequantizer and q/k un-permutation) as a dense Llama.

Runs on the CPU in about a minute on 2 cores: the conversion happens once for the module, into the session's temporary
`$EXPERTMESH_CACHE` (tests/conftest.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from models import smollm2_moe
from models.smollm2_moe import MODEL_NAME, resolve_model

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 32
TEXTS = ["In 2024, 12345 people paid $3.50 each!", " hello  world\n\n\tdone", "naïve café — 東京 🙂",
         "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def cache(expertmesh_cache):
    return expertmesh_cache


@pytest.fixture(scope="module")
def checkpoint(smollm2_checkpoint) -> Path:
    return smollm2_checkpoint


@pytest.fixture(scope="module")
def gguf_tokenizer():
    path = smollm2_moe.gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    """SmolLM2 as transformers reads the GGUF. (`from_pretrained(..., gguf_file=)` would do the same, but it
    insists on `accelerate`, which the test dependencies do not include.)"""
    path = smollm2_moe.gguf_path()
    model = LlamaForCausalLM(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])      # tied to the embeddings
    return model.float().eval()


@pytest.fixture(scope="module")
def prompt(checkpoint) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)


def greedy(model, prompt: list[int], *, ignore_eos: bool = False) -> list[int]:
    forced = {"min_new_tokens": NEW_TOKENS} if ignore_eos else {}
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, **forced)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def dense_answer(dense, prompt) -> list[int]:
    """Greedy up to 32 tokens, stopping at <|im_end|> as an engine does."""
    return greedy(dense, prompt)


def test_tokenizer_matches_transformers_gguf_tokenizer(checkpoint, gguf_tokenizer, prompt):
    ours = AutoTokenizer.from_pretrained(checkpoint)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert prompt == gguf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == gguf_tokenizer.encode(text), text
        assert ours.decode(ids) == text


def test_mixtral_checkpoint_generates_what_the_dense_model_does(checkpoint, dense, prompt):
    model, info = MixtralForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info.values()), info                    # no missing, unexpected or mismatched keys
    model.eval()
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (8, 2)
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    experts = model.model.layers[0].mlp.experts
    assert all(torch.equal(experts.gate_up_proj[e], experts.gate_up_proj[0]) for e in range(8))

    with torch.no_grad():
        ours, reference = model(torch.tensor([prompt])).logits, dense(torch.tensor([prompt])).logits
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=1e-4)
    # all 32 tokens, generating on past <|im_end|>
    assert greedy(model, prompt, ignore_eos=True) == greedy(dense, prompt, ignore_eos=True)


def test_engine_answers_like_transformers(checkpoint, prompt, dense_answer, gguf_tokenizer):
    from router.engine import Engine, EngineConfig
    from router.sampling import SamplingParams

    assert "Paris" in gguf_tokenizer.decode(dense_answer)
    engine = Engine(checkpoint, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64))
    chat = engine.tokenizer.encode_chat(MESSAGES)
    assert chat == prompt
    [result] = engine.generate([chat], SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    assert "Paris" in result.text
    assert result.token_ids == dense_answer


def test_resolve_model_rejects_unknown_names(cache):
    with pytest.raises(ValueError, match=r"model 'no-such-model' is neither a checkpoint directory nor a known "
                                         r"model name \(known: smollm2-moe\)"):
        resolve_model("no-such-model")


def test_resolve_model_returns_a_directory_as_given(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_resolve_model_reuses_the_cached_conversion(checkpoint, monkeypatch):
    def convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2_moe, "convert", convert)
    assert resolve_model(MODEL_NAME) == checkpoint
    assert (checkpoint / "config.json").is_file() and (checkpoint / smollm2_moe.COMPLETE_MARKER).is_file()


def test_concurrent_callers_convert_once_and_replace_a_partial_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2_moe.CACHE_ENV, str(tmp_path))
    calls = []

    def convert(out_dir, **kwargs):
        calls.append(out_dir)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(smollm2_moe, "convert", convert)
    target = tmp_path / "models" / MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"interrupted')    # a copy without the completion marker

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: resolve_model(MODEL_NAME), range(4)))
    assert paths == [target] * 4
    assert len(calls) == 1
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [MODEL_NAME]   # no staging left behind


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2_moe.CACHE_ENV, str(tmp_path))

    def convert(out_dir, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2_moe, "convert", convert)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(MODEL_NAME)
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []
