"""A model family's chat format as the ingress needs it: the prompt, the output constraint, the parser.

Two output formats exist (models/chat_output.py): harmony for gpt-oss, Hermes-style `<think>` and
`<tool_call>` blocks for Qwen3 and other ChatML models. This module turns an OpenAI chat request into
the rendered prompt, an llguidance grammar when the output is constrained (`response_format`,
`tool_choice` required or named), and a fresh output parser per choice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from deployments.protocol import APIError, ChatCompletionRequest
from models.chat_output import HarmonyOutputParser, HermesOutputParser
from models.tokenizer import Tokenizer

# Compact JSON inside constrained outputs: free whitespace lets a weak model pad forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass
class RenderedChat:
    text: str
    token_ids: list[int]
    dropped_messages: int = 0              # by truncation="auto"


def _text_content(content: Any) -> str | None:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer, model_type: str):
        self.tokenizer = tokenizer
        self.harmony = model_type == "gpt_oss"
        think = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
        # Reasoning blocks exist where the vocabulary has <think> and </think> as single tokens (Qwen3).
        self.think_ids = think if None not in think else None
        # A hybrid template (Qwen3's enable_thinking) always opens <think> when thinking is on.
        template = tokenizer.chat_template
        sources = template.values() if isinstance(template, dict) else [template or ""]
        self.hybrid_thinking = self.think_ids is not None and any("enable_thinking" in s for s in sources)
        call = tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")
        self.call_ids = call if None not in call else None

    # -- the prompt ------------------------------------------------------------------------------

    def render(self, request: ChatCompletionRequest, messages: list[dict] | None = None) -> RenderedChat:
        messages = [self._normalize(m) for m in (messages if messages is not None else request.messages)]
        kwargs = dict(request.chat_template_kwargs or {})
        if request.reasoning_effort is not None:
            kwargs["reasoning_effort"] = request.reasoning_effort
        tools = [t.model_dump(exclude_none=True) for t in request.tools] \
            if request.tools and request.tool_choice != "none" else None
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **kwargs)
        except (ValueError, TypeError) as error:
            raise APIError(400, f"the messages cannot be rendered: {error}", param="messages") from None
        except Exception as error:  # a template's own raise_exception (jinja2 TemplateError)
            raise APIError(400, f"the chat template rejected the messages: {error}", param="messages") from None
        return RenderedChat(text, self.tokenizer.encode(text, add_special_tokens=False))

    @staticmethod
    def _normalize(message: dict) -> dict:
        message = dict(message)
        if "content" in message:
            message["content"] = _text_content(message["content"])
        return message

    def render_to_fit(self, request: ChatCompletionRequest, max_model_len: int, completion_tokens: int | None
                      ) -> RenderedChat:
        """Render; with truncation="auto", drop the oldest non-system turns until the prompt plus
        the completion fit (a turn is a message with its tool results; the last message stays)."""
        rendered = self.render(request)
        if request.truncation != "auto":
            return rendered
        budget = max_model_len - (completion_tokens or 1)
        messages, dropped = list(request.messages), 0
        while len(rendered.token_ids) > budget:
            first = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), None)
            if first is None or first == len(messages) - 1:
                break                                                    # nothing left to drop
            del messages[first]
            dropped += 1
            while first < len(messages) - 1 and messages[first].get("role") == "tool":
                del messages[first]                                      # results of a dropped call
                dropped += 1
            rendered = self.render(request, messages)
        rendered.dropped_messages = dropped
        return rendered

    # -- the output --------------------------------------------------------------------------------

    def prompt_opens_reasoning(self, prompt_text: str) -> bool:
        return self.think_ids is not None and prompt_text.rstrip().endswith("<think>")

    def reasoning_allowed(self, request: ChatCompletionRequest, prompt_text: str) -> bool:
        if self.harmony:
            return True
        if self.think_ids is None:
            return False
        tail = prompt_text[prompt_text.rfind("assistant"):] if "assistant" in prompt_text else prompt_text
        return "</think>" not in tail          # enable_thinking=False writes an empty, closed block

    def parser(self, request: ChatCompletionRequest, prompt_text: str):
        parse_tools = bool(request.tools) and request.tool_choice != "none"
        if self.harmony:
            return HarmonyOutputParser(parse_tools=parse_tools)
        return HermesOutputParser(in_reasoning=self.prompt_opens_reasoning(prompt_text),
                                  parse_reasoning=self.think_ids is not None, parse_tools=parse_tools)

    # -- constrained decoding ------------------------------------------------------------------------

    def grammar(self, request: ChatCompletionRequest, prompt_text: str) -> str | None:
        """The llguidance grammar the output must follow, or None when it is free."""
        body = self._forced_body(request)
        if body is None:
            return None
        prefix, *reasoning = self._reasoning_rules(request, prompt_text)
        lark = "\n".join([f"start: {prefix}body", *reasoning, *body])
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise APIError(400, f"the output constraint cannot be compiled: {messages[0] if messages else grammar}",
                           param="response_format" if request.response_format else "tools")
        return grammar

    def _reasoning_rules(self, request, prompt_text) -> list[str]:
        """[prefix of `start`, rules...] for the reasoning the model may write before the body;
        `thinking_token_budget` caps its length (the grammar then closes the block)."""
        budget = f"[max_tokens={request.thinking_token_budget}]" if request.thinking_token_budget else ""
        text = f"reasoning_text{budget}: /(?s:.*)/"
        if self.harmony:
            # gpt-oss always reasons in the analysis channel before it answers or calls.
            return ["analysis ", 'analysis: <|channel|> "analysis" <|message|> reasoning_text <|end|> <|start|> "assistant"',
                    text]
        if not self.reasoning_allowed(request, prompt_text):
            return [""]
        open_id, close_id = self.think_ids
        if self.prompt_opens_reasoning(prompt_text):
            return ["think ", f'think: reasoning_text <[{close_id}]> "\\n\\n"', text]
        prefix = "think " if self.hybrid_thinking else "think? "
        return [prefix, f'think: <[{open_id}]> reasoning_text <[{close_id}]> "\\n\\n"', text]

    def _forced_body(self, request: ChatCompletionRequest) -> list[str] | None:
        """Rules defining `body`, or None when nothing is forced."""
        choice = request.tool_choice
        if choice not in (None, "auto", "none") and not request.tools:
            raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} "
                                "needs tools", param="tool_choice")
        if request.tools and (choice == "required" or not isinstance(choice, (str, type(None)))):
            tools = {t.function.name: t.function for t in request.tools}
            if isinstance(choice, str):
                names, parallel = list(tools), request.parallel_tool_calls
            else:
                if choice.function.name not in tools:
                    raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not "
                                        f"among the tools ({', '.join(tools)})", param="tool_choice")
                names, parallel = [choice.function.name], False
            return self._calls_rules({n: tools[n].parameters or {"type": "object", "properties": {}} for n in names},
                                     parallel)
        fmt = request.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            schema: Any = {"type": "object"}
        else:
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            schema = fmt.json_schema.schema_
        json_rule = self._json(schema)
        if self.harmony:
            return [f"body: <|channel|> \"final\" <|message|> {json_rule} <|return|>"]
        return [f"body: {json_rule}"]

    def _calls_rules(self, tools: dict[str, dict], parallel: bool) -> list[str]:
        if self.harmony:       # harmony has one call per turn: it ends at <|call|>
            alternatives = [f'<|channel|> "commentary to=functions.{name} " <|constrain|> "json" <|message|> '
                            f"{self._json(schema)} <|call|>" for name, schema in tools.items()]
            return ["body: " + " | ".join(alternatives)]
        call_schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                                  "required": ["name", "arguments"], "additionalProperties": False}
                                 for name, schema in tools.items()]}
        open_tag, close_tag = (f"<[{self.call_ids[0]}]>", f"<[{self.call_ids[1]}]>") if self.call_ids \
            else ('"<tool_call>"', '"</tool_call>"')
        rules = [f'call: {open_tag} "\\n" {self._json(call_schema)} "\\n" {close_tag}']
        return ["body: call (\"\\n\" call)*" if parallel else "body: call", *rules]

    @staticmethod
    def _json(schema: Any) -> str:
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}
        try:
            return "%json " + json.dumps(schema)
        except (TypeError, ValueError) as error:
            raise APIError(400, f"the JSON schema is not JSON: {error}", param="response_format") from None
