"""The `expertmesh generate` contract, run as users and outside tools run it: the installed console
script in a subprocess. Its greedy tokens are compared with transformers on the same checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

EXPERTMESH = str(Path(sys.executable).parent / "expertmesh")
QUESTION = "What is the capital of France?"


def run(*args, env_cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, EXPERTMESH_CACHE=str(env_cache))
    return subprocess.run([EXPERTMESH, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    model = MixtralForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    return tokenizer, model


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_generate_chat_json_matches_transformers(smollm2_checkpoint, expertmesh_cache, reference):
    tokenizer, model = reference
    done = run("generate", "--model", "smollm2-moe", "--chat", QUESTION, "--max-tokens", "24",
               "--temperature", "0", "--dtype", "float32", "--json", env_cache=expertmesh_cache)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    expected = hf_greedy(model, prompt, 24)
    # Both keep the EOS token that ended the answer among the ids (as vLLM does); the text leaves it out.
    assert result["token_ids"] == expected
    assert result["finish_reason"] == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in result["text"]


def test_generate_token_ids_streams_the_same_text_as_json(smollm2_checkpoint, expertmesh_cache, reference):
    tokenizer, model = reference
    prompt = tokenizer.encode("The three primary colors are")
    common = ("generate", "--model", str(smollm2_checkpoint), "--prompt-token-ids", ",".join(map(str, prompt)),
              "--max-tokens", "12", "--temperature", "0", "--dtype", "float32")
    streamed = run(*common, env_cache=expertmesh_cache)
    as_json = run(*common, "--json", env_cache=expertmesh_cache)
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["token_ids"] == hf_greedy(model, prompt, 12)
    assert streamed.stdout == result["text"] + "\n"


@pytest.mark.parametrize("args,message", [
    (("--model", "no-such-model", "--prompt", "hi"), "neither a checkpoint directory nor a known model name"),
    (("--model", "smollm2-moe", "--prompt-token-ids", "1,2,x"), "comma-separated integers"),
    (("--model", "smollm2-moe", "--prompt", "hi", "--temperature", "-1"), "temperature"),
])
def test_bad_input_fails_with_a_clear_message(expertmesh_cache, smollm2_checkpoint, args, message):
    done = run("generate", *args, "--max-tokens", "2", env_cache=expertmesh_cache)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""
