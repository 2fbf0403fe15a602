"""Pydantic models of the OpenAI /v1/completions and /v1/chat/completions requests, and of the
error body every failure answers with.

Unknown fields are rejected (as OpenAI does); types are strict (`"3"` is not a number, `1` is not
a boolean; `3.0` is the integer 3, as JSON has it) and ranges are checked here, so the handlers
never see an out-of-range value and the OpenAPI schema says exactly what is accepted. Limits an
operator sets (n, stop strings) are GatewayConfig's, checked in requests.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pagewire.sampling.params import MAX_LOGPROBS

MAX_N = 128  # OpenAI's own cap; GatewayConfig.max_n is the one that applies
INT32_MAX = (1 << 31) - 1  # top_k travels as a protobuf int32


def _encodable(text: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"): valid JSON, but no UTF-8 text to send on.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("string_unicode",
                                  "Input should be valid Unicode (it holds a lone surrogate)"
                                  ) from None
    return text


def _not_text_or_bool(value: object) -> object:
    if isinstance(value, (str, bool)):  # pydantic's lax int takes "3" and true
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _bool_only(value: object) -> object:
    if not isinstance(value, bool):  # Literal[False] alone matches 0 (0 == False)
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


# 3 or 3.0 (JSON does not tell them apart), never "3", true or 3.5.
Int = Annotated[int, BeforeValidator(_not_text_or_bool)]
Text = Annotated[StrictStr, AfterValidator(_encodable)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1), AfterValidator(_encodable)]
TokenIds = Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]


def _text_or_list(value: object) -> str | None:
    return "text" if isinstance(value, str) else "list" if isinstance(value, list) else None


def _text_or_list_of(member, what: str):
    """A string or a list: validated as the one it is, so errors name that branch only."""
    return Annotated[Annotated[NonEmptyText, Tag("text")] | Annotated[member, Tag("list")],
                     Discriminator(_text_or_list, custom_error_type="invalid_type",
                                   custom_error_message=f"must be a string or a list of {what}")]


def _number(**bounds) -> object:
    return Field(default=None, strict=True, allow_inf_nan=False, **bounds)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: NonEmptyText
    description: Text | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` extra field: one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict | Text | None = Field(default=None, alias="json")
    regex: NonEmptyText | None = None
    choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    grammar: NonEmptyText | None = None
    json_object: StrictBool | None = None


class SamplingFields(_Strict):
    model: Text
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: float | None = _number(ge=0, le=2)
    top_p: float | None = _number(gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = _number(ge=0, le=1)
    n: Int = Field(default=1, ge=1, le=MAX_N)
    seed: Int | None = Field(default=None, ge=0, lt=1 << 63)
    stop: _text_or_list_of(list[NonEmptyText], "strings") | None = None
    presence_penalty: float | None = _number(ge=-2, le=2)
    frequency_penalty: float | None = _number(ge=-2, le=2)
    repetition_penalty: float | None = _number(gt=0, le=2)
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    # vLLM's older names for structured_outputs' fields
    guided_json: dict | Text | None = None
    guided_regex: NonEmptyText | None = None
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    guided_grammar: NonEmptyText | None = None
    guided_decoding_backend: Text | None = None  # accepted and ignored: xgrammar decides

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: _text_or_list_of(TokenIds, "token ids")
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Annotated[Literal[False], BeforeValidator(_bool_only)] = False  # not supported


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(_Strict):
    name: NonEmptyText
    arguments: Text


class ToolCallParam(_Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "content is required (an assistant message may "
                                      "have tool_calls instead)")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(_Strict):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]
    description: Text | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx and 5xx the gateway answers has this shape."""

    error: ErrorDetail
