"""Tool-call parsers for tool_choice "auto": a model's text in, (content, tool calls) out,
under vLLM's names for `--tool-call-parser`.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, after
                 optional text (Hermes, Qwen2.5/3, and the prompt pagewire gives templates
                 without tool support: render.py)
    llama3_json  {"name": ..., "parameters": {...}} as the whole output, calls separated by
                 ";", optionally after <|python_tag|> (Llama 3.1/3.2)
    mistral      [TOOL_CALLS] then a JSON list of {"name", "arguments"} (Mistral)

A call that does not parse is left in the content: the client sees what the model wrote. The
streaming side (`StreamingParser`) passes text through until a call may begin, holds it until
the call is complete, then hands out the call whole. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pagewire.tools.calls import ToolCall

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    content: str  # the text that is not a call, as written (the answer's content is None
    calls: list[ToolCall]  # when all of it is whitespace and there are calls)


def _call(obj: object, arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # already JSON text (some models write it so)
        return ToolCall(obj["name"], arguments)
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_hermes(text: str) -> Parsed:
    calls, kept, last = [], [], 0
    for match in HERMES_CALL.finditer(text):
        call = _call(_loads(match.group(1)))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    return Parsed("".join(kept), calls) if calls else Parsed(text, [])


def parse_llama3_json(text: str) -> Parsed:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return Parsed(text, [])
    calls = [_call(_loads(part), "parameters") for part in _split_objects(body)]
    if not calls or any(c is None for c in calls):
        return Parsed(text, [])
    return Parsed("", calls)


def parse_mistral(text: str) -> Parsed:
    before, marker, after = text.partition("[TOOL_CALLS]")
    if not marker:
        return Parsed(text, [])
    listed = _loads(after.strip())
    listed = listed if isinstance(listed, list) else [listed]
    calls = [_call(item) for item in listed]
    if not calls or any(c is None for c in calls):
        return Parsed(text, [])
    return Parsed(before, calls)


def _split_objects(body: str) -> list[str]:
    """Top-level JSON objects separated by ';' (or nothing), as Llama 3 writes several."""
    parts, depth, start, in_string, escaped = [], 0, 0, False, False
    for i, ch in enumerate(body):
        if in_string:
            escaped = ch == "\\" and not escaped
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                parts.append(body[start:i + 1])
                start = i + 1
        elif depth == 0 and ch not in " \n\t;":
            return [body]  # text between objects: not a list of calls
    return parts if body[start:].strip(" \n\t;") == "" else [body]


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral}
# Where a call may begin in streamed text, per parser: text from there on is held back.
CALL_STARTS = {"hermes": "<tool_call>", "llama3_json": "{", "mistral": "[TOOL_CALLS]"}


def parser_named(name: str):
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {', '.join(PARSERS)}")
    return PARSERS[name]


class StreamingParser:
    """Feeds streamed text through a parser: content passes on at once, except text from the
    point where a call may begin, which waits until the end (or until it is clearly content),
    and whitespace before any other content (an answer of calls alone has no content).
    Content streamed plus `finish().content` is what `parse` makes of the whole text."""

    def __init__(self, name: str):
        self._parse = parser_named(name)
        self._start = CALL_STARTS[name]
        self._at_output_start = name == "llama3_json"  # its calls are the whole output
        self._seen = ""
        self._held = ""
        self._space = ""  # leading whitespace, not yet known to be content
        self._spoke = False

    def feed(self, text: str) -> str:
        """Content that can go out now."""
        out = self._feed(text)
        if self._spoke:
            return out
        self._space += out
        if not self._space.strip():
            return ""
        out, self._space, self._spoke = self._space, "", True
        return out

    def _feed(self, text: str) -> str:
        self._seen += text
        if self._held:
            self._held += text
            return ""
        if self._at_output_start:
            stripped = self._seen.lstrip().removeprefix("<|python_tag|>").lstrip()
            if not stripped or "<|python_tag|>".startswith(stripped):  # the tag, partly in
                return ""
            if stripped.startswith("{"):
                self._held = self._seen
                return ""
            self._at_output_start = False
            out, self._seen = self._seen, ""
            return out
        position = self._seen.find(self._start)
        if position >= 0:
            self._held = self._seen[position:]
            out, self._seen = self._seen[:position], ""
            return out
        keep = _partial_suffix(self._seen, self._start)  # "<tool_" may be a call starting
        out, self._seen = self._seen[:len(self._seen) - keep], self._seen[len(self._seen) - keep:]
        return out

    @property
    def spoke(self) -> bool:
        """Whether any content went out (whitespace waits until other text follows it)."""
        return self._spoke

    def finish(self) -> Parsed:
        """The calls in the held text, and the content not streamed yet."""
        held, self._held = self._held + ("" if self._held else self._seen), ""
        self._seen = ""
        parsed = self._parse(held) if held else Parsed("", [])
        return Parsed(self._space + parsed.content, parsed.calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
