"""A request's output constraint, from whichever field asked for it: OpenAI's response_format,
vLLM's structured_outputs (or its older guided_* names), or a forced tool call. At most one may;
a constraint that is not well-formed is a 400 here, one the grammar backend cannot compile is a
400 from the worker (INVALID_ARGUMENT)."""

from __future__ import annotations

from pagewire.sampling.structured import StructuredOutputsParams
from pagewire.tools.calls import ToolChoice
from pagewire.v1 import common_pb2

from .errors import bad_request
from .protocol import ChatCompletionRequest, SamplingFields


def tool_choice_of(request: SamplingFields) -> ToolChoice:
    if not isinstance(request, ChatCompletionRequest):
        return ToolChoice("none")
    tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
    choice = request.tool_choice
    try:
        return ToolChoice.of(tools, choice.model_dump() if hasattr(choice, "model_dump")
                             else choice)
    except ValueError as exc:
        raise bad_request(str(exc), param="tool_choice") from None


def constraint_of(request: SamplingFields,
                  tool_choice: ToolChoice) -> StructuredOutputsParams | None:
    asked = {name: value for name, value in _asked(request).items() if value is not None}
    if tool_choice.mode in ("named", "required"):
        tools = [t.model_dump(exclude_none=True) for t in request.tools]
        asked["tool_choice"] = lambda: tool_choice.constraint(tools, request.parallel_tool_calls)
    if len(asked) > 1:
        raise bad_request(f"only one output constraint per request; got {', '.join(asked)}",
                          param=next(iter(asked)))
    if not asked:
        return None
    (param, build), = asked.items()
    try:
        return build()
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param=param) from None


def _asked(request: SamplingFields) -> dict:
    """param -> a function making its StructuredOutputsParams, None where not asked."""
    fmt, so = request.response_format, request.structured_outputs
    asked = {"response_format": None, "structured_outputs": None}
    if fmt is not None and fmt.type == "json_object":
        asked["response_format"] = lambda: StructuredOutputsParams(json_object=True)
    elif fmt is not None and fmt.type == "json_schema":
        def schema():
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("a json_schema response format needs json_schema.schema")
            return StructuredOutputsParams(json=fmt.json_schema.schema_)
        asked["response_format"] = schema
    if so is not None:
        asked["structured_outputs"] = lambda: StructuredOutputsParams(
            json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
            json_object=so.json_object)
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(request, f"guided_{name}")
        asked[f"guided_{name}"] = None if value is None else \
            (lambda name=name, value=value: StructuredOutputsParams(**{name: value}))
    return asked


def to_proto(params: StructuredOutputsParams) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(kind=params.kind, spec=params.spec)
