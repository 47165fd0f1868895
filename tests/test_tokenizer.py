"""Tokenizer, chat templates, harmony and streaming detokenization.

Reference outputs come from the real libraries, offline: tokenizers trained here on a small text and
loaded back with transformers' `AutoTokenizer`, the encodings bundled in quicktok, and the
`openai_harmony` renderer (fed an o200k_base vocabulary file written from quicktok's copy).
"""
import base64
import json
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer, decoders, models as bpe_models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from models import harmony
from models.tokenizer import Tokenizer
from router.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, café naïve résumé déjà vu — 中文字符测试，你好世界 😀🎉👍🏽 emoji!",
    "The quick brown fox jumps over the lazy dog. Ünïcödé ß Ω ≈ ∑ 日本語 한국어",
    "def f(x):\n    return x * 2  # tabs\tand  spaces\n",
] * 20
SAMPLES = ["Hello world", "café 中文 😀 mixed", "  leading spaces and trailing ", "new\nlines\n\n", "Ω≈∑🏽"]
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief. Réponds en français 中文."},
    {"role": "user", "content": "Hello 😀, what's 2+2?"},
    {"role": "assistant", "content": "4", "reasoning": "simple sum"},
    {"role": "user", "content": "And <|im_end|> as text?"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]


def train(pre_tokenizer, decoder, alphabet=()) -> RustTokenizer:
    tok = RustTokenizer(bpe_models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                                        initial_alphabet=list(alphabet), show_progress=False))
    return tok


def byte_level() -> RustTokenizer:
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                 pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """Byte-level BPE saved by transformers: BOS comes from tokenizer.json's post-processor."""
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=byte_level(), bos_token="<s>", eos_token="</s>", add_bos_token=True,
                            chat_template=CHAT_TEMPLATE).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    return path


@pytest.fixture(scope="module")
def config_bos_dir(tmp_path_factory):
    """A bare tokenizer.json with no post-processor, and named chat templates. transformers 5 adds no
    BOS/EOS here whatever tokenizer_config.json's add_bos_token says: the post-processor decides."""
    path = tmp_path_factory.mktemp("config_bos")
    byte_level().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True,
        "chat_template": [{"name": "default", "template": CHAT_TEMPLATE},
                          {"name": "tool_use", "template": "TOOLS{{ tools | tojson }}" + CHAT_TEMPLATE}]}))
    return path


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    """A sentencepiece-style tokenizer: `▁` marks spaces and decoding drops the first leading space."""
    path = tmp_path_factory.mktemp("metaspace")
    tok = train(pre_tokenizers.Metaspace(), decoders.Metaspace())
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


@pytest.mark.parametrize("fixture", ["bpe_dir", "config_bos_dir", "metaspace_dir"])
def test_encode_decode_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ours, ref = Tokenizer.from_pretrained(path, "qwen3_moe"), AutoTokenizer.from_pretrained(path)
    for text in SAMPLES + ["<s>special <|im_end|> inside</s>"]:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.vocab_size == len(ref)
    # all_special_ids: what decode(skip_special_tokens=True) drops, i.e. every added token marked special.
    assert set(ref.all_special_ids) <= ours.all_special_ids
    assert ours.all_special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}


def test_bos_and_eos_follow_the_configs(bpe_dir, config_bos_dir):
    tok = Tokenizer.from_pretrained(bpe_dir, "qwen3_moe")
    assert tok.encode("Hello")[0] == tok.bos_token_id == 0
    assert tok.eos_token_ids == (1, 3)   # generation_config's list, then eos_token (already in it)
    tok = Tokenizer.from_pretrained(config_bos_dir, "qwen3_moe")
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,)


@pytest.mark.parametrize("kwargs", [
    {}, {"add_generation_prompt": False}, {"tools": TOOLS}, {"enable_thinking": False},
])
@pytest.mark.parametrize("fixture", ["bpe_dir", "config_bos_dir"])
def test_chat_template_matches_transformers(fixture, kwargs, request):
    path = request.getfixturevalue(fixture)
    ours, ref = Tokenizer.from_pretrained(path, "qwen3_moe"), AutoTokenizer.from_pretrained(path)
    messages = MESSAGES + [{"role": "assistant", "content": None,
                            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]}]
    ref_kwargs = {"add_generation_prompt": True, **kwargs}
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, **ref_kwargs)
    assert text.startswith("TOOLS" if fixture == "config_bos_dir" and "tools" in kwargs else "<s>")
    ids = ours.encode_chat(messages, **kwargs)
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False, **ref_kwargs)
    assert ids.count(ours.bos_token_id) == 1   # the template's BOS, no second one


def test_missing_chat_template_and_tokenizer(tmp_path):
    byte_level().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path, "mixtral").apply_chat_template(MESSAGES)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"{tmp_path}.*tokenizer.json is missing"):
        Tokenizer.from_pretrained(tmp_path, "mixtral")


# ---------------------------------------------------------------------------- quicktok fallback

@pytest.mark.parametrize("model_type, eos, end_token, vocab_size", [
    ("gpt_oss", (200002, 199999, 200012), "<|end|>", 201088),
    ("qwen3_moe", (151645, 151643), "<|im_end|>", 151669),   # len() of the HF Qwen3 tokenizer
])
def test_bundled_fallback(tmp_path, model_type, eos, end_token, vocab_size):
    tok = Tokenizer.from_pretrained(tmp_path, model_type)
    assert tok.eos_token_ids == eos and tok.bos_token_id is None
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode(f"hi{end_token}")
    assert ids[-1] == tok.token_to_id(end_token) and ids[-1] in tok.all_special_ids
    assert tok.decode(ids) == "hi" and tok.decode(ids, skip_special_tokens=False) == f"hi{end_token}"
    assert tok.vocab_size == vocab_size


def test_bundled_fallback_eos_from_checkpoint_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 151645}))
    assert Tokenizer.from_pretrained(tmp_path, "qwen3_moe").eos_token_ids == (151645,)


def test_qwen3_keeps_think_markers_when_skipping_specials(tmp_path):
    tok = Tokenizer.from_pretrained(tmp_path, "qwen3_moe")
    ids = tok.encode("<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|im_end|>")
    assert tok.decode(ids) == "assistant\n<think>\nhmm\n</think>\n\nok"
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


# ---------------------------------------------------------------------------- harmony

@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory, monkeypatch_module):
    """openai_harmony's gpt-oss encoding, loaded offline from an o200k_base file written from quicktok."""
    import quicktok
    openai_harmony = pytest.importorskip("openai_harmony")
    base = quicktok.get_encoding("o200k_base")
    path = tmp_path_factory.mktemp("tiktoken")
    lines = [base64.b64encode(base.decode_single_token_bytes(i)) + b" %d\n" % i for i in range(199998)]
    (path / "o200k_base.tiktoken").write_bytes(b"".join(lines))
    monkeypatch_module.setenv("TIKTOKEN_ENCODINGS_BASE", str(path))
    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the weather.\nIn a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": "integer", "default": 3},
        "tags": {"type": "array", "items": {"type": "string"}, "title": "Tags", "examples": ["x"]},
        "flag": {"type": ["boolean", "null"]},
        "when": {"description": "A date or a day count", "oneOf": [{"type": "string"}, {"type": "number",
                                                                                      "nullable": True}]},
        "nested": {"type": "object", "description": "More", "properties": {"a": {"type": "number"}}},
    }}}}
NOARGS = {"type": "function", "function": {"name": "ping", "description": "Ping."}}


def reference_render(harmony_encoding, kept, *, effort, tools, date, add_generation_prompt):
    """Render with openai_harmony. `kept` lists the messages our renderer keeps, as (role, fields)."""
    from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort,
                                RenderConversationConfig, Role, SystemContent, ToolDescription)
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())) \
        .with_conversation_start_date(date)
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    dev = DeveloperContent.new()
    if kept and kept[0][0] == "instructions":
        dev = dev.with_instructions(kept.pop(0)[1])
    if tools:
        dev = dev.with_function_tools([ToolDescription.new(t["function"]["name"], t["function"]["description"],
                                                           t["function"].get("parameters")) for t in tools])
    if tools or dev.instructions:
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    for kind, *rest in kept:
        if kind == "user":
            out.append(Message.from_role_and_content(Role.USER, rest[0]))
        elif kind in ("analysis", "final"):
            out.append(Message.from_role_and_content(Role.ASSISTANT, rest[0]).with_channel(kind))
        elif kind == "call":
            out.append(Message.from_role_and_content(Role.ASSISTANT, rest[1]).with_channel("commentary")
                       .with_recipient(f"functions.{rest[0]}").with_content_type("<|constrain|>json"))
        elif kind == "tool":
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{rest[0]}"), rest[1])
                       .with_channel("commentary").with_recipient("assistant"))
    config = RenderConversationConfig(auto_drop_analysis=False)
    conversation = Conversation.from_messages(out)
    ids = harmony_encoding.render_conversation_for_completion(conversation, Role.ASSISTANT, config) \
        if add_generation_prompt else harmony_encoding.render_conversation(conversation, config)
    return harmony_encoding.decode_utf8(ids), ids


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
HARMONY_CASES = [
    # A finished tool-using turn: its reasoning is dropped, as the model no longer needs it.
    ([{"role": "system", "content": "Answer in riddles."}, {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
      {"role": "assistant", "content": "Warm, 20°C 😀", "reasoning_content": "Answer now."},
      {"role": "user", "content": "Thanks!"}],
     [("instructions", "Answer in riddles."), ("user", "Weather in Paris?"), ("call", "get_weather", '{"city":"Paris"}'),
      ("tool", "get_weather", '{"temp": 20}'), ("final", "Warm, 20°C 😀"), ("user", "Thanks!")],
     {"tools": [WEATHER, NOARGS], "reasoning_effort": "high"}),
    # A turn still calling tools keeps the reasoning before the call.
    ([{"role": "user", "content": "中文 weather?"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
      {"role": "tool", "name": "get_weather", "content": "sunny"}],
     [("user", "中文 weather?"), ("analysis", "Let me check."), ("call", "get_weather", '{"city":"Paris"}'),
      ("tool", "get_weather", "sunny")],
     {"tools": [WEATHER]}),
    # No tools, no system message; the trailing answer keeps its reasoning when no prompt is added.
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning": "greet"}],
     [("user", "hi"), ("analysis", "greet"), ("final", "hello")],
     {"reasoning_effort": "low", "add_generation_prompt": False}),
]


@pytest.mark.parametrize("messages, kept, kwargs", HARMONY_CASES)
def test_harmony_matches_openai_harmony(harmony_encoding, messages, kept, kwargs, tmp_path):
    date = "2025-06-28"
    text = harmony.render_conversation(messages, conversation_start_date=date, **kwargs)
    ref_text, ref_ids = reference_render(
        harmony_encoding, list(kept), effort=kwargs.get("reasoning_effort", "medium"), tools=kwargs.get("tools"),
        date=date, add_generation_prompt=kwargs.get("add_generation_prompt", True))
    assert text == ref_text
    tok = Tokenizer.from_pretrained(tmp_path, "gpt_oss")   # no chat template: harmony
    assert tok.encode(text) == ref_ids
    assert tok.encode_chat(messages, conversation_start_date=date, **kwargs) == ref_ids


def test_harmony_parse_completion(harmony_encoding):
    from openai_harmony import Role
    completion = ("<|channel|>analysis<|message|>Need weather.<|end|>"
                  "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                  '<|message|>{"city":"Paris"}<|call|>')
    parsed = harmony.parse_completion(completion)
    assert parsed == {"reasoning": "Need weather.", "content": None,
                      "tool_calls": [{"name": "get_weather", "arguments": '{"city":"Paris"}'}]}
    ref = harmony_encoding.parse_messages_from_completion_tokens(
        harmony_encoding.encode(completion, allowed_special="all"), Role.ASSISTANT)
    assert [(m.channel, m.recipient, m.content[0].text) for m in ref] == [
        ("analysis", None, "Need weather."), ("commentary", "functions.get_weather", '{"city":"Paris"}')]

    final = harmony.parse_completion("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>final"
                                     "<|message|>The answer 😀<|return|>")
    assert final == {"reasoning": "a", "content": "The answer 😀", "tool_calls": []}
    assert harmony.parse_completion("<|channel|>final<|message|>cut off mid")["content"] == "cut off mid"


# ---------------------------------------------------------------------------- detokenizer

def stream(tok, ids, skip, rng):
    detok = IncrementalDetokenizer(tok, prompt_ids=[5, 6, 7], skip_special_tokens=skip)
    pieces, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        pieces.append(detok.step(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return "".join(pieces)


@pytest.mark.parametrize("fixture", ["bpe_dir", "metaspace_dir", "gpt_oss", "qwen3_moe"])
def test_detokenizer_streams_the_full_decode(fixture, request, tmp_path):
    if fixture in ("gpt_oss", "qwen3_moe"):
        tok = Tokenizer.from_pretrained(tmp_path, fixture)
    else:
        tok = Tokenizer.from_pretrained(request.getfixturevalue(fixture), "qwen3_moe")
    rng = random.Random(0)
    texts = [" ".join(SAMPLES), "😀🎉👍🏽中文", "é" * 7 + "</s><|im_end|> x"]
    sequences = [tok.encode(t, add_special_tokens=False) for t in texts]
    specials = sorted(tok.all_special_ids)[:4]
    sequences += [[rng.randrange(tok.vocab_size) if rng.random() > 0.1 else rng.choice(specials)
                   for _ in range(rng.randrange(1, 60))] for _ in range(30)]
    for ids in sequences:
        for skip in (True, False):
            assert stream(tok, ids, skip, rng) == tok.decode(ids, skip_special_tokens=skip), ids


def test_detokenizer_holds_back_split_characters(bpe_dir):
    tok = Tokenizer.from_pretrained(bpe_dir, "qwen3_moe")
    raw = RustTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    # The emoji's four UTF-8 bytes as four single-byte tokens of the byte-level alphabet.
    ids = [raw.token_to_id(_bytes_to_unicode()[b]) for b in "😀".encode()]
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert [detok.step([i]) for i in ids] == ["", "", "", "😀"]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.step(ids[:2]) == "" and detok.flush() == tok.decode(ids[:2]) and "\ufffd" in detok.text


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]
