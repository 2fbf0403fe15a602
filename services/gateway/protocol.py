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


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text
    name: Text | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx and 5xx the gateway answers has this shape."""

    error: ErrorDetail
