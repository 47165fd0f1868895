"""Constrained decoding in the engine: whatever a random-weight model prefers, the output follows
the grammar (checked with the `jsonschema` validator, not by our own parser)."""
from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest

from router.engine import Engine, EngineConfig
from router.sampling import SamplingParams
from tests import chat_checkpoints

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = chat_checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3"))
    return Engine(path, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=512))


def grammar(schema) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})


def test_json_schema_output_validates_in_a_mixed_batch(engine):
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Who?"}], enable_thinking=False)
    constrained = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, grammar=grammar(SCHEMA)) for s in range(3)]
    free = SamplingParams(max_tokens=10, temperature=1.0, seed=0, ignore_eos=True)
    results = engine.generate([prompt] * 4, constrained + [free])
    for result in results[:3]:
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert results[3].finish_reason == "length" and len(results[3].token_ids) == 10


def test_greedy_constrained_output_is_the_best_allowed_token_each_step(engine):
    prompt = engine.tokenizer.encode("Answer: ")
    params = SamplingParams(max_tokens=40, temperature=0, grammar=llguidance.LLMatcher.grammar_from_regex("(yes|no)!"))
    [result] = engine.generate([prompt], params)
    assert result.text in ("yes!", "no!")
    assert result.finish_reason == "stop"


def test_a_grammar_that_does_not_compile_is_a_value_error(engine):
    with pytest.raises(ValueError, match="constraint"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, grammar=llguidance.LLMatcher.grammar_from_lark(
            "start: undefined_rule")))
