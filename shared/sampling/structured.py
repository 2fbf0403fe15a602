"""What a constrained request's output must match, shaped like vLLM's `StructuredOutputsParams`.

Exactly one constraint: a JSON schema (`json`, a dict or its JSON text), any JSON object
(`json_object=True`), a regular expression (`regex`), one of several strings (`choice`) or a
grammar in EBNF (`grammar`, xgrammar's GBNF dialect). Pure data, validated at construction:
whether the backend can compile it is the engine's to say (pagewire.structured_output), as a
clear error for that one request.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a schema or grammar larger than 1 MiB is refused before compiling


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    json: str | dict | None = None
    """A JSON schema the output must validate against (strict: no extra properties)."""
    json_object: bool | None = None
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """An EBNF grammar whose start rule is `root`."""

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs need exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(given) or 'none'}")
        if self.json is not None:
            text = self.json if isinstance(self.json, str) else _dumps(self.json)
            try:
                schema = json_module.loads(text)
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema must be an object")
            object.__setattr__(self, "json", text)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("json_object must be true when given")
        if self.choice is not None:
            if not isinstance(self.choice, list | tuple) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} constraint is over {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text: what the grammar cache and the wire carry."""
        if self.kind == "choice":
            return _dumps(self.choice)
        if self.kind == "json_object":
            return ""
        return getattr(self, self.kind)

    @classmethod
    def from_spec(cls, kind: str, spec: str) -> StructuredOutputsParams:
        """The inverse of (kind, spec), for a constraint that crossed the wire."""
        if kind not in KINDS:
            raise ValueError(f"unknown structured output kind {kind!r}; one of {KINDS}")
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "choice":
            try:
                return cls(choice=json_module.loads(spec))
            except ValueError as exc:
                raise ValueError(f"choice must be a JSON list: {exc}") from None
        return cls(**{kind: spec})


def _dumps(value) -> str:
    # Key order kept: a schema's property order is the order the output writes them in.
    return json_module.dumps(value, ensure_ascii=False)
