"""The harmony chat format of gpt-oss: render OpenAI-style chat messages into a prompt, and split a
generated completion back into reasoning, content and tool calls.

The text matches what the `openai_harmony` library renders (system message, developer message with the
tool definitions as a TypeScript namespace, `<|constrain|>json` tool calls), so that a checkpoint without
a chat template still gets the prompt format the model was trained on.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
REASONING_EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"


# --------------------------------------------------------------------------- tool definitions

def _json(value: Any) -> str:
    """Compact JSON, as serde_json prints a value."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(schema: dict) -> bool:
    return isinstance(schema.get("enum"), list) and len(schema["enum"]) > 0


def _default_text(schema: dict, default: Any, *, quote_enum_strings: bool = False) -> str:
    """How a default value is shown in a `// default: ...` comment."""
    if isinstance(default, str) and not _is_enum(schema):
        return f'"{default}"'
    if isinstance(default, str) and not quote_enum_strings:
        return default
    return _json(default)


def _with_null(schema: dict, type_str: str) -> str:
    if schema.get("nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _lines(text: str) -> list[str]:
    """Lines of `text` the way Rust's `str::lines` splits them."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema (OpenAPI style) as the TypeScript-like type harmony shows the model."""
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            variant = variant if isinstance(variant, dict) else {}
            out += f"\n{indent} | " + _with_null(variant, schema_to_typescript(variant, indent + "   "))
            comments = []
            if isinstance(variant.get("description"), str):
                comments.append(variant["description"])
            if "default" in variant:
                comments.append("default: " + _default_text(variant, variant["default"], quote_enum_strings=True))
            if comments:
                out += " // " + " ".join(comments)
        return out
    types = schema.get("type")
    if isinstance(types, list):
        names = ["number" if t == "integer" else t for t in types if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(types, str):
        return "any"
    if types == "object":
        return _object_to_typescript(schema, indent)
    if types == "string":
        enum = schema.get("enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if types in ("number", "integer"):
        return "number"
    if types == "boolean":
        return "boolean"
    if types == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = ""
    if isinstance(schema.get("description"), str):
        out += f"{indent}// {schema['description']}\n"
    out += "{\n"
    props = schema.get("properties")
    required = {r for r in schema.get("required") or [] if isinstance(r, str)} \
        if isinstance(schema.get("required"), list) else set()
    for key, val in (props.items() if isinstance(props, dict) else ()):
        val = val if isinstance(val, dict) else {}
        optional = "" if key in required else "?"
        if isinstance(val.get("title"), str):
            out += f"{indent}// {val['title']}\n{indent}//\n"
        if "oneOf" not in val and isinstance(val.get("description"), str):
            out += f"{indent}// {val['description']}\n"
        examples = val.get("examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
        if isinstance(val.get("oneOf"), list):
            out += _one_of_property(key, optional, val, indent)
            continue
        out += f"{indent}{key}{optional}: "
        out += _with_null(val, schema_to_typescript(val, indent + "    ")) + ","
        if "oneOf" not in val and "default" in val:
            out += " // default: " + _default_text(val, val["default"])
        out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key: str, optional: str, val: dict, indent: str) -> str:
    """A property whose schema is a `oneOf`: one `|` line per variant."""
    variants = val["oneOf"]
    out = ""
    prop_desc = val.get("description") if isinstance(val.get("description"), str) else None
    first_desc = variants[0].get("description") if variants and isinstance(variants[0], dict) else None
    desc_above = prop_desc is not None and prop_desc != first_desc
    if desc_above:
        out += f"{indent}// {prop_desc}\n"
    if "default" in val:
        out += f"{indent}// default: {_default_text(val, val['default'])}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        out += f"{indent} | " + _with_null(variant, schema_to_typescript(variant, indent + "   "))
        comments = []
        desc = variant.get("description")
        if not (i == 0 and desc_above) and isinstance(desc, str) and desc != prop_desc:
            comments.append(desc)
        if "default" in variant:
            comments.append("default: " + _default_text(variant, variant["default"]))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


def _function(tool: dict) -> dict:
    """The function description of an OpenAI-style tool (`{"type": "function", "function": {...}}` or bare)."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def render_tools_section(tools: list[dict], namespace: str = "functions") -> str:
    """The `# Tools` section declaring `tools` in a TypeScript namespace."""
    parts = [f"## {namespace}\n", f"namespace {namespace} {{\n"]
    for tool in map(_function, tools):
        parts.extend(f"// {line}" for line in _lines(tool.get("description") or ""))
        params = tool.get("parameters")
        signature = f"(_: {schema_to_typescript(params)})" if params is not None else "()"
        parts.append(f"type {tool['name']} = {signature} => any;\n")
    parts.append(f"}} // namespace {namespace}")
    return "# Tools\n\n" + "\n".join(parts)


# --------------------------------------------------------------------------- conversation

def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _reasoning(message: dict) -> str | None:
    for key in ("reasoning_content", "reasoning", "thinking"):
        if message.get(key):
            return message[key]
    return None


def _message(header: str, body: str, end: str = END) -> str:
    return f"{START}{header}{MESSAGE}{body}{end}"


def render_conversation(
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    reasoning_effort: str = "medium",
    tools: list[dict] | None = None,
    model_identity: str = DEFAULT_MODEL_IDENTITY,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
    conversation_start_date: str | None = None,
) -> str:
    """Render OpenAI-style chat `messages` in the harmony format.

    A leading system (or developer) message becomes the developer instructions; `tools` (OpenAI function
    tools) are declared in the developer message. Assistant `content` goes to the `final` channel and
    `tool_calls` to `commentary` as `to=functions.NAME` calls; tool results are `functions.NAME to=assistant`
    messages. Reasoning (`reasoning_content`, `reasoning` or `thinking`) is rendered in the `analysis`
    channel only where the model still needs it: on tool calls with no final answer after them, and on a
    trailing assistant message when no generation prompt is added. `conversation_start_date` defaults to
    today (YYYY-MM-DD).
    """
    effort = reasoning_effort.lower()
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    date = conversation_start_date or datetime.now().strftime("%Y-%m-%d")
    tools = list(tools or [])

    top = [model_identity, f"Knowledge cutoff: {knowledge_cutoff}", f"Current date: {date}"]
    channels = f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    if tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    out = [_message("system", "\n\n".join(["\n".join(top), f"Reasoning: {effort}", channels]))]

    messages = list(messages)
    instructions = None
    if messages and messages[0].get("role") in ("system", "developer"):
        instructions = _text(messages.pop(0).get("content"))
    developer = []
    if instructions:
        developer += ["# Instructions", instructions]
    if tools:
        developer.append(render_tools_section(tools))
    if developer:
        out.append(_message("developer", "\n\n".join(developer)))

    call_names: dict[str, str] = {}
    last_call = None
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "user":
            out.append(_message("user", _text(msg.get("content"))))
        elif role in ("system", "developer"):
            out.append(_message("developer", "# Instructions\n\n" + _text(msg.get("content"))))
        elif role == "assistant":
            calls = msg.get("tool_calls") or []
            later_final = any(m.get("role") == "assistant" and not m.get("tool_calls") for m in messages[i + 1:])
            is_last = i == len(messages) - 1
            keep_reasoning = not later_final if calls else (is_last and not add_generation_prompt)
            content = _text(msg.get("content"))
            # Like the gpt-oss chat template, the text beside a tool call is the reasoning that led to it.
            reasoning = _reasoning(msg) or (content if calls else None)
            if reasoning and keep_reasoning:
                out.append(_message(f"assistant{CHANNEL}analysis", reasoning))
            if calls:
                for call in calls:
                    fn = call.get("function", call)
                    args = fn.get("arguments", "{}")
                    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    out.append(_message(f"assistant to=functions.{fn['name']}{CHANNEL}commentary {CONSTRAIN}json",
                                        args, CALL))
                    if call.get("id"):
                        call_names[call["id"]] = fn["name"]
                    last_call = fn["name"]
            else:
                out.append(_message(f"assistant{CHANNEL}final", content))
        elif role == "tool":
            name = msg.get("name") or call_names.get(msg.get("tool_call_id")) or last_call
            if not name:
                raise ValueError("a tool message needs a name, a tool_call_id, or an earlier assistant tool call")
            out.append(_message(f"functions.{name} to=assistant{CHANNEL}commentary", _text(msg.get("content"))))
        else:
            raise ValueError(f"unknown message role {role!r}")
    if add_generation_prompt:
        out.append(f"{START}assistant")
    return "".join(out)


# --------------------------------------------------------------------------- parsing

_STOP = re.compile(re.escape(END) + "|" + re.escape(RETURN) + "|" + re.escape(CALL))


def parse_completion(text: str) -> dict:
    """Split generated assistant text (decoded with special tokens) into its parts.

    `text` is what follows the `<|start|>assistant` generation prompt, possibly holding several messages.
    Returns `{"reasoning": str | None, "content": str | None, "tool_calls": [{"name", "arguments"}]}`:
    `analysis` messages are reasoning, `final` messages (and `commentary` without a recipient) are content,
    and messages addressed `to=functions.NAME` are tool calls. A message cut off before its end token is
    kept as far as it got.
    """
    reasoning: list[str] = []
    content: list[str] = []
    tool_calls: list[dict] = []
    for chunk in text.split(START):
        if MESSAGE not in chunk:
            continue
        header, body = chunk.split(MESSAGE, 1)
        stop = _STOP.search(body)
        body = body[:stop.start()] if stop else body
        recipient = re.search(r"\bto=(\S+?)(?=\s|<\||$)", header)
        channel = re.search(re.escape(CHANNEL) + r"\s*([^\s<]+)", header)
        channel_name = channel.group(1) if channel else "final"
        if recipient and recipient.group(1) != "assistant":
            name = recipient.group(1)
            tool_calls.append({"name": name.removeprefix("functions."), "arguments": body})
        elif channel_name == "analysis":
            reasoning.append(body)
        else:
            content.append(body)
    return {
        "reasoning": "\n".join(reasoning) if reasoning else None,
        "content": "".join(content) if content else None,
        "tool_calls": tool_calls,
    }
