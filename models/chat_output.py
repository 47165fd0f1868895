"""Streaming parsers that split a chat model's generated text into reasoning, content and tool calls.

Two output formats cover the families:

- `HarmonyOutputParser` (gpt-oss): the text is decoded with its control tokens. `analysis` messages
  are reasoning, `final` messages (and `commentary` without a recipient) are content, and a message
  addressed `to=functions.NAME` is a call whose body is the JSON arguments.
- `HermesOutputParser` (Qwen3 and other ChatML models): `<think>…</think>` at the start is reasoning,
  `<tool_call>{"name": …, "arguments": …}</tool_call>` blocks are calls, the rest is content.

`feed(delta)` returns the events the new text completes; `finish()` those still held back. Text
that could be the beginning of a marker is held back until it is decided, so reasoning never leaks
into content, and a call is emitted only once it parses: what cannot be parsed as a call is content.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class ToolCall:
    name: str
    arguments: str              # JSON text of the arguments object


@dataclass
class Event:
    kind: str                   # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: ToolCall | None = None


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Where a proper prefix of one of `markers` starts at the end of `text` (len(text) if none)."""
    longest = max(len(m) for m in markers)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(m.startswith(tail) and len(m) > len(tail) for m in markers):
            return start
    return len(text)


def parse_call_json(text: str) -> ToolCall | None:
    """`{"name": str, "arguments": object}` (arguments also as a JSON string) -> ToolCall, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class HermesOutputParser:
    THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
    CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, *, in_reasoning: bool = False, parse_reasoning: bool = True, parse_tools: bool = False):
        """`in_reasoning`: the prompt ends inside an open <think> block."""
        self.state = "reasoning" if in_reasoning else "start"
        self.parse_reasoning = parse_reasoning
        self.parse_tools = parse_tools
        self.buffer = ""
        self.calls = 0
        self._after_think = False               # the blank line after </think> is not content

    def feed(self, delta: str) -> list[Event]:
        self.buffer += delta
        events: list[Event] = []
        while True:
            progressed = getattr(self, f"_{self.state}")(events)
            if not progressed:
                return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        text, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            events.append(Event("reasoning", text))
        elif self.state == "tool":
            call = parse_call_json(text.strip())
            events.append(Event("tool_call", call=call) if call else Event("content", self.CALL_OPEN + text))
        elif text.strip() or (text and not self.calls):
            events.append(Event("content", text))
        return [e for e in events if e.call or e.text]

    # -- states: each consumes what it can decide and says whether it changed anything --

    def _start(self, events: list[Event]) -> bool:
        stripped = self.buffer.lstrip()
        if self.parse_reasoning and stripped.startswith(self.THINK_OPEN):
            self.buffer, self.state = stripped[len(self.THINK_OPEN):], "reasoning"
            return True
        if self.parse_reasoning and self.THINK_OPEN.startswith(stripped):
            return False                                          # maybe the start of <think>
        self.state = "content"
        return True

    def _reasoning(self, events: list[Event]) -> bool:
        end = self.buffer.find(self.THINK_CLOSE)
        if end >= 0:
            events.append(Event("reasoning", self.buffer[:end]))
            self.buffer, self.state = self.buffer[end + len(self.THINK_CLOSE):].lstrip("\n"), "content"
            self._after_think = True
            return True
        keep = _partial_suffix(self.buffer, (self.THINK_CLOSE,))
        if keep:
            events.append(Event("reasoning", self.buffer[:keep]))
            self.buffer = self.buffer[keep:]
        return False

    def _content(self, events: list[Event]) -> bool:
        if self._after_think:
            if not self.buffer.strip("\n"):
                return False
            self.buffer, self._after_think = self.buffer.lstrip("\n"), False
        start = self.buffer.find(self.CALL_OPEN) if self.parse_tools else -1
        if start >= 0:
            self._emit_content(events, self.buffer[:start], before_call=True)
            self.buffer, self.state = self.buffer[start + len(self.CALL_OPEN):], "tool"
            return True
        keep = _partial_suffix(self.buffer, (self.CALL_OPEN,)) if self.parse_tools else len(self.buffer)
        text = self.buffer[:keep]
        if self.calls and not text.strip():
            return False                       # whitespace between calls: held until something follows
        self._emit_content(events, text)
        self.buffer = self.buffer[keep:]
        return False

    def _emit_content(self, events: list[Event], text: str, before_call: bool = False) -> None:
        if before_call and not text.strip():
            return
        if text:
            events.append(Event("content", text))

    def _tool(self, events: list[Event]) -> bool:
        end = self.buffer.find(self.CALL_CLOSE)
        if end < 0:
            return False
        body, self.buffer = self.buffer[:end], self.buffer[end + len(self.CALL_CLOSE):]
        call = parse_call_json(body.strip())
        if call is None:
            events.append(Event("content", self.CALL_OPEN + body + self.CALL_CLOSE))
        else:
            self.calls += 1
            events.append(Event("tool_call", call=call))
        self.state = "content"
        return True


class HarmonyOutputParser:
    START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
    CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
    _BODY_ENDS = (END, CALL, RETURN)
    _MARKERS = (START, END, MESSAGE, CHANNEL, CALL, RETURN, CONSTRAIN)

    def __init__(self, *, parse_tools: bool = True):
        self.parse_tools = parse_tools
        self.state = "header"                  # the prompt ends with `<|start|>assistant`
        self.buffer = ""
        self.header = ""
        self.channel: str | None = None
        self.recipient: str | None = None
        self.saw_message = False
        self.body = ""                           # a call's arguments so far
        self.calls = 0

    def feed(self, delta: str) -> list[Event]:
        self.buffer += delta
        events: list[Event] = []
        while self._header(events) if self.state == "header" else self._body(events):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.state == "body":
            self._end_body(events, self.buffer)
        elif not self.saw_message and (self.header + self.buffer).strip():
            events.append(Event("content", self.header + self.buffer))     # no harmony structure at all
        self.buffer = ""
        return events

    def _header(self, events: list[Event]) -> bool:
        at = self.buffer.find(self.MESSAGE)
        if at < 0:
            return False
        self.header += self.buffer[:at]
        self.buffer = self.buffer[at + len(self.MESSAGE):]
        header = self.header.replace(self.START, " ")
        recipient = re.search(r"\bto=(\S+?)(?=\s|<\||$)", header)
        channel = re.search(re.escape(self.CHANNEL) + r"\s*([^\s<]+)", header)
        self.recipient = recipient.group(1) if recipient else None
        self.channel = channel.group(1) if channel else None
        self.state, self.header, self.saw_message = "body", "", True
        return True

    def _is_call(self) -> bool:
        return self.parse_tools and self.recipient is not None and self.recipient.startswith("functions.")

    def _route(self) -> str:
        return "reasoning" if self.channel == "analysis" else "content"

    def _body(self, events: list[Event]) -> bool:
        ends = [(i, m) for m in self._BODY_ENDS if (i := self.buffer.find(m)) >= 0]
        if ends:
            at, marker = min(ends)
            self._end_body(events, self.buffer[:at])
            self.buffer = self.buffer[at + len(marker):]
            self.state = "header"
            # the next message's header starts after <|start|> (e.g. `assistant<|channel|>final`)
            return True
        keep = _partial_suffix(self.buffer, self._MARKERS)
        if self._is_call():
            self.body += self.buffer[:keep]
        elif keep:
            events.append(Event(self._route(), self.buffer[:keep]))
        self.buffer = self.buffer[keep:]
        return False

    def _end_body(self, events: list[Event], text: str) -> None:
        if not self._is_call():
            if text:
                events.append(Event(self._route(), text))
            return
        arguments = (self.body + text).strip()
        try:
            valid = isinstance(json.loads(arguments), dict)
        except ValueError:
            valid = False
        if valid:
            self.calls += 1
            events.append(Event("tool_call", call=ToolCall(self.recipient.removeprefix("functions."), arguments)))
        else:
            events.append(Event("content", arguments))
        self.body = ""
