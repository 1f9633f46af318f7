"""The OpenAI API's request and response bodies as pydantic models, and its errors.

Requests are strict (no "10" for 10, no true for 1) and closed: a field herd does not know is
refused by name rather than silently ignored. A failed validation becomes one ApiError in OpenAI's
shape that names the field (`param`). Chat messages stay plain dicts here: the chat format
(herd/tokenizer/chat_format.py) checks them, for the server and the Python API alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import annotated_types
from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # biased tokens per request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)


def brief(v: Any) -> str:
    """A client's value for an error message: its JSON, cut short (and never failing on odd values)."""
    try:
        return json.dumps(v[:40] if isinstance(v, str) else v)[:40]  # a 30 MB string is not written whole
    except (ValueError, TypeError, RecursionError):
        return type(v).__name__


# ---- requests -------------------------------------------------------------------------------------

Count = Annotated[int, Field(ge=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields both routes take; None means "not given" (the server's default applies)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Any = None  # checked before the body (it picks the model: a wrong one is a 404)
    max_tokens: Count | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=0.999)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-2 ** 63, lt=2 ** 64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None  # vLLM's extension
    logit_bias: dict[str, Any] | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, unused
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
        "strict"}} as (True, schema or None) for JSON, None for text; the schema is compiled later."""
        if v is None:
            return None
        kind = v.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return (True, None)
        if kind != "json_schema":
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {brief(kind)}")
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("json_schema must be an object with a 'schema' object (and a 'name')")
        return (True, spec.get("schema", {}))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > MAX_STOP or not all(stops)):
            raise ValueError("empty or too many")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        """Token ids (as strings, OpenAI's JSON keys) to numbers in [-100, 100]; the vocabulary bound is
        the model's, checked with it."""
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"has {len(v)} entries; at most {MAX_LOGIT_BIAS}")
        out = {}
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit() and len(key) < 10):
                raise ValueError(f"keys must be token ids, got {brief(key)}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"values must be numbers in [-100, 100], got {brief(bias)} for token {key}")
            out[int(key)] = float(bias)
        return out

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, _FIELD_MESSAGES["stream_options"], "stream_options")
        return self


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Any], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] = "auto"
    parallel_tool_calls: bool | None = None

    @field_validator("parallel_tool_calls")
    @classmethod
    def _parallel(cls, v):
        if v is False:
            raise ValueError("false is not supported (a reply may call several tools)")
        return v

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return self


class CompletionRequest(GenerationRequest):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _batch_of_one(cls, v):
        return v[0] if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)) else v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("is not supported")
        return v


# Messages for fields whose every failure says the same; others are built from the error's kind.
_FIELD_MESSAGES = {
    "messages": "'messages' must be a non-empty list of messages",
    "stop": f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
    "prompt": "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
    "tools": "'tools' must be a list of tool definitions",
    "tool_choice": "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}",
    "stream_options": "'stream_options' is only allowed with 'stream': true, as an object",
    "suffix": "'suffix' is not supported",
    "best_of": "'best_of' is not supported (only 1)",
}
_NOT_YET: dict[str, str] = {}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "dict": "an object",
          "list": "a list"}


def parse(cls: type[GenerationRequest], body: dict) -> GenerationRequest:
    """The body as ``cls``, or the ApiError that names the first field at fault."""
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise _api_error(cls, e.errors(include_url=False)) from None


def _api_error(cls: type[GenerationRequest], errors: list[dict]) -> ApiError:
    unknown = [str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden"]
    if unknown:
        name = unknown[0][:60]
        return ApiError(400, f"'{name}' is not supported" + (f" ({_NOT_YET[name]})" if name in _NOT_YET else "")
                        + (f"; nor {len(unknown) - 1} more field(s)" if len(unknown) > 1 else ""), name)
    err = errors[0]
    name = str(err["loc"][0]) if err["loc"] else None
    if name is None:
        return ApiError(400, err["msg"])
    if name in _FIELD_MESSAGES:
        return ApiError(400, _FIELD_MESSAGES[name], name)
    if err["type"] == "missing":
        return ApiError(400, f"'{name}' is required", name)
    if err["type"] == "value_error":
        return ApiError(400, f"'{name}' {err['ctx']['error']}", name)
    kind = err["type"].split("_")[0]
    if kind in _KINDS and err["type"].endswith(("_type", "_parsing", "_finite_number")):
        return ApiError(400, f"'{name}' must be {_KINDS[kind]}, got {brief(err['input'])}", name)
    lo, hi, lo_open, hi_open = _bounds(cls, name)
    return ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                    f"got {brief(err['input'])}", name)


def _bounds(cls: type[GenerationRequest], name: str) -> tuple[Any, Any, bool, bool]:
    """A numeric field's bounds, from its annotation's constraints."""
    lo, hi, lo_open, hi_open = "-inf", "inf", False, False
    field = cls.model_fields[name]
    constraints = list(field.metadata)  # Annotated[int, Field(...)] alone; inside a union, on its member
    for arg in getattr(field.annotation, "__args__", ()):
        for info in getattr(arg, "__metadata__", ()):
            constraints += getattr(info, "metadata", [info])
    for m in constraints:
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi, hi_open = m.lt, True
    return lo, hi, lo_open, hi_open


# ---- responses ------------------------------------------------------------------------------------


def _without_none(out: dict, keys: tuple[str, ...]) -> dict:
    """A dumped body without those of ``keys`` whose value is None: OpenAI leaves such fields out."""
    return {k: v for k, v in out.items() if not (k in keys and v is None)}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Function(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: Function


class StreamedToolCall(ToolCall):
    index: int


class Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is tool calls
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler):
        return _without_none(handler(self), ("tool_calls",))


class ChatChoice(BaseModel):
    index: int
    message: Message
    logprobs: dict | None = None
    finish_reason: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class _Reply(BaseModel):
    id: str
    created: int
    model: str


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Completion(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[StreamedToolCall] | None = None

    @model_serializer(mode="wrap")
    def _only_given(self, handler):
        return _without_none(handler(self), ("role", "content", "tool_calls"))


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: dict | None = None
    finish_reason: str | None = None


class _Chunk(_Reply):
    usage: Usage | None = None
    error: ErrorBody | None = None

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        return _without_none(handler(self), ("usage", "error"))


class ChatChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice] = []


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice] = []


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "herd"
