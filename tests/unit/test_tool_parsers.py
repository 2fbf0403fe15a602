"""Tool-call parsers on fixed model outputs, whole and streamed: the streamed content plus
the calls at the end are exactly what the whole text parses to, however the text is cut."""

from __future__ import annotations

import json

import pytest

from pagewire.tools.calls import ToolCall, ToolChoice, required_calls
from pagewire.tools.parsers import PARSERS, StreamingParser, parser_named

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CASES = {  # parser -> (model output, content, [(name, arguments)])
    "hermes": [
        (f"<tool_call>\n{WEATHER}\n</tool_call>", "",
         [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        (f"Let me look.\n<tool_call>{WEATHER}</tool_call>\n<tool_call>"
         '{"name": "get_time", "arguments": {}}</tool_call>', "Let me look.\n\n",
         [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})]),
        ("No tools needed: it is sunny.", "No tools needed: it is sunny.", []),
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
         [("get_weather", {"city": "Oslo"})]),
        ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
         "", [("a", {}), ("b", {"x": 1})]),
        ("Oslo is cold {in winter}.", "Oslo is cold {in winter}.", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', "",
         [("get_weather", {"city": "Rome"})]),
        ("Rome is warm.", "Rome is warm.", []),
    ],
}


def _expected(calls):
    return [(name, args) for name, args in calls]


def _got(parsed_calls):
    return [(c.name, json.loads(c.arguments)) for c in parsed_calls]


@pytest.mark.parametrize("name, output, content, calls",
                         [(n, *case) for n, cases in CASES.items() for case in cases])
def test_each_parser_extracts_calls_and_keeps_the_rest(name, output, content, calls):
    parsed = parser_named(name)(output)
    assert parsed.content == content and _got(parsed.calls) == _expected(calls)


@pytest.mark.parametrize("name, output", [(n, c[0]) for n, cases in CASES.items() for c in cases])
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_text_reassembles_to_the_whole_parse(name, output, piece):
    streaming = StreamingParser(name)
    streamed = "".join(streaming.feed(output[i:i + piece]) for i in range(0, len(output), piece))
    end = streaming.finish()
    whole = PARSERS[name](output)
    assert streamed + end.content == whole.content
    assert _got(end.calls) == _got(whole.calls)


def test_hermes_streams_content_before_a_call_at_once():
    streaming = StreamingParser("hermes")
    assert streaming.feed("Checking the ") == "Checking the "
    assert streaming.feed("weather <tool_") == "weather "  # may be a call starting: held
    assert streaming.feed("call>{\"name\": \"f\", \"arguments\": {}}</tool_call>") == ""
    assert [c.name for c in streaming.finish().calls] == ["f"]


def test_tool_choice_modes_and_their_constraints():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "get_time"}}]
    assert ToolChoice.of(tools, None).mode == "auto"
    assert ToolChoice.of(None, None).mode == "none"
    named = ToolChoice.of(tools, {"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.constraint(tools, True).json)["required"] == ["city"]
    required = json.loads(ToolChoice.of(tools, "required").constraint(tools, False).json)
    assert required["minItems"] == required["maxItems"] == 1
    names = [c["properties"]["name"]["enum"] for c in required["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert ToolChoice.of(tools, "auto").constraint(tools, True) is None
    with pytest.raises(ValueError, match="not in tools"):
        ToolChoice.of(tools, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs tools"):
        ToolChoice.of([], "required")
    calls = required_calls('[{"name": "get_time", "parameters": {}}]')
    assert [c.name for c in calls] == ["get_time"] and calls[0].arguments == "{}"
    assert ToolCall("f", "{}").as_dict()["id"].startswith("chatcmpl-tool-")
