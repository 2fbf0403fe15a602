"""Tool calls in OpenAI's shape, and how tool_choice turns into an output constraint.

    none      the model answers in text; tools are still shown to it (vLLM's default)
    auto      it may call tools: its text is parsed by a tool-call parser (parsers.py)
    required  it must call at least one: its output is constrained to a JSON list of
              {"name", "parameters"} objects, one schema per tool (vLLM's shape)
    {"type": "function", "function": {"name": F}}
              it must call F: its output is constrained to F's parameters schema, and is F's
              arguments as they are

So even a small model returns arguments that validate against the function's schema whenever a
call is forced. Pure: no I/O, no tokenizer.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from pagewire.sampling.structured import StructuredOutputsParams

ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's function.arguments carries it
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    """How one request's output relates to its tools (see the module's docstring)."""

    mode: str  # none | auto | required | named
    function: str | None = None  # named: the function to call

    @classmethod
    def of(cls, tools: list[dict] | None, tool_choice: str | dict | None) -> ToolChoice:
        """OpenAI's rules: tools without a tool_choice mean auto, no tools mean none."""
        if tool_choice is None:
            return cls("auto" if tools else "none")
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            if name not in {t["function"]["name"] for t in tools or []}:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
            return cls("named", name)
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        return cls(tool_choice)

    def constraint(self, tools: list[dict], parallel: bool) -> StructuredOutputsParams | None:
        """The grammar a forced call is decoded under; None for none and auto."""
        if self.mode == "named":
            tool = next(t for t in tools if t["function"]["name"] == self.function)
            return StructuredOutputsParams(json=_parameters(tool))
        if self.mode == "required":
            calls = [{"type": "object", "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": _parameters(t)}, "required": ["name", "parameters"]}
                for t in tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or ANY_OBJECT


def required_calls(text: str) -> list[ToolCall]:
    """The calls of a `required` output: the JSON list its grammar made it write."""
    return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
            for c in json.loads(text)]
