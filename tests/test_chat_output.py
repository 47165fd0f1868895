"""The output parsers on known text: however the text is cut into deltas, reasoning, content and
tool calls come out the same, and reasoning never leaks into content."""
from __future__ import annotations

import json
import random

import pytest

from models.chat_output import HarmonyOutputParser, HermesOutputParser


def parse(make_parser, text: str, seed: int) -> dict:
    rng, parser, events, i = random.Random(seed), make_parser(), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        events += parser.feed(text[i:i + n])
        i += n
    events += parser.finish()
    out = {"reasoning": "", "content": "", "calls": []}
    for event in events:
        if event.kind == "tool_call":
            out["calls"].append((event.call.name, json.loads(event.call.arguments)))
        else:
            out[event.kind] += event.text
    return out


QWEN = ('<think>\nThe user wants weather.\n</think>\n\nLet me check. <b>ok</b>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')


@pytest.mark.parametrize("seed", range(6))
def test_hermes_reasoning_content_and_parallel_calls(seed):
    out = parse(lambda: HermesOutputParser(parse_tools=True), QWEN, seed)
    assert out["reasoning"].strip() == "The user wants weather."
    assert out["content"] == "Let me check. <b>ok</b>\n"
    assert out["calls"] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]


def test_hermes_malformed_call_is_content():
    text = 'Sure.<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>'
    out = parse(lambda: HermesOutputParser(parse_tools=True), text, 0)
    assert out["calls"] == [] and out["content"] == text


def test_hermes_unterminated_reasoning_stays_reasoning():
    out = parse(lambda: HermesOutputParser(), "<think>still thinking about </thi", 1)
    assert out == {"reasoning": "still thinking about </thi", "content": "", "calls": []}


def test_hermes_prompt_opened_think_block():
    out = parse(lambda: HermesOutputParser(in_reasoning=True), "hmm</think>\n\nAnswer", 2)
    assert out["reasoning"] == "hmm" and out["content"] == "Answer"


def test_hermes_without_tools_keeps_tool_markup_as_content():
    out = parse(lambda: HermesOutputParser(parse_tools=False), QWEN, 3)
    assert "<tool_call>" in out["content"] and out["calls"] == []


HARMONY = ("<|channel|>analysis<|message|>Need the <weather> tool.<|end|><|start|>assistant"
           "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}")


@pytest.mark.parametrize("seed", range(6))
def test_harmony_analysis_then_call(seed):
    out = parse(HarmonyOutputParser, HARMONY, seed)
    assert out == {"reasoning": "Need the <weather> tool.", "content": "", "calls": [("get_weather", {"city": "Paris"})]}


@pytest.mark.parametrize("seed", range(3))
def test_harmony_analysis_then_final(seed):
    text = "<|channel|>analysis<|message|>2+2 is 4<|end|><|start|>assistant<|channel|>final<|message|>It is 4."
    assert parse(HarmonyOutputParser, text, seed) == {"reasoning": "2+2 is 4", "content": "It is 4.", "calls": []}


def test_harmony_recipient_in_the_role_and_malformed_arguments():
    good = parse(HarmonyOutputParser, ' to=functions.f<|channel|>commentary json<|message|>{"a": 1}', 0)
    assert good["calls"] == [("f", {"a": 1})]
    bad = parse(HarmonyOutputParser, ' to=functions.f<|channel|>commentary json<|message|>{"a": ', 0)
    assert bad["calls"] == [] and bad["content"] == '{"a":'


def test_harmony_text_without_structure_is_content():
    assert parse(HarmonyOutputParser, "plain words", 0)["content"] == "plain words"
