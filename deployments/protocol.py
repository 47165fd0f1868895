"""The OpenAI request bodies the ingress accepts, and its error type.

Fields follow OpenAI's API reference; the extensions vLLM users know are marked as such.
Unknown fields are rejected with a 400 naming them, so a typo never silently changes nothing.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error the client sees as OpenAI's `{"error": {...}}` body with this HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def __reduce__(self):   # crosses Ray processes (a gRPC call's error goes replica -> proxy) intact
        return _api_error, (self.status, self.message, self.param, self.code, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _api_error(status, message, param, code, headers) -> APIError:
    return APIError(status, message, param=param, code=code, headers=headers)


def validation_error(error: ValidationError) -> APIError:
    """A pydantic error as one readable 400: `field.path: problem; ...`."""
    problems = []
    for item in error.errors()[:8]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown parameter"
        problems.append(f"{where}: {message}")
    first = error.errors()[0]["loc"] if error.errors() else ()
    return APIError(400, "; ".join(problems), param=str(first[0]) if first else None)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The sampling fields both endpoints share."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Requests with the same key go to the same router replica, whose prefix cache holds what they
    # share (a conversation's earlier turns): as OpenAI uses it to route to its caches.
    prompt_cache_key: str | None = Field(None, min_length=1, max_length=1024)
    # extensions (vLLM)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        """OpenAI's shape: token ids (as JSON object keys, so strings) to a bias in [-100, 100]."""
        for key, bias in (value or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{key}] must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return value


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(_Body):
    name: str = Field("response", pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # extensions
    include_reasoning: bool = True                          # vLLM: false drops reasoning_content
    chat_template_kwargs: dict[str, Any] | None = None      # e.g. {"enable_thinking": false}
    thinking_token_budget: int | None = Field(None, ge=1)   # caps the reasoning of a constrained output
    truncation: Literal["auto", "disabled"] = "disabled"    # auto: drop the oldest turns to fit the context
    skip_special_tokens: bool = True
    store: bool | None = None                               # accepted for SDK compatibility; nothing is stored
    metadata: dict[str, str] | None = None                  # accepted for SDK compatibility

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages):
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, developer, user, assistant or tool, "
                                 f"got {role!r}")
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise ValueError(f"messages[{i}].content: only text parts are supported, got {kind!r}")
            elif content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
            if role == "tool" and not (message.get("tool_call_id") or message.get("name")):
                raise ValueError(f"messages[{i}]: a tool message needs tool_call_id")
        return messages


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported by these models")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value):
        if value not in (None, 1):
            raise ValueError("best_of is not supported; use n")
        return value
