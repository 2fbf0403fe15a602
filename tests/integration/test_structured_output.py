"""Structured outputs and tool calls through the whole pipeline with the official openai client,
colocated (one worker doing both) and disaggregated (a prefill and a decode worker, the grammar
rebuilt on the decode worker from the first token): every response_format kind gives JSON that
validates against its schema, forced tool calls give arguments that validate, `auto` extracts
calls with the parser, streamed deltas reassemble to the whole answer, and a constraint the
backend cannot compile is a 400 that leaves the workers serving."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.integration.stack import Stack

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]}, "legs": {"type": "integer"}},
        "required": ["kind", "legs"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"]}},
    "required": ["name", "age", "pets", "address"]}
SCHEMAS = {
    "nested object with arrays and enums": PERSON,
    "enum alone": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}},
                   "required": ["mood"]},
    "array of numbers": {"type": "object", "properties": {"scores": {
        "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4}},
        "required": ["scores"]},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 24}},
                   "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=[("both",), ("prefill", "decode")],
                ids=["colocated", "disaggregated"])
def stack(request):
    stack = Stack(roles=request.param)
    yield stack
    stack.stop()


def chat(client, model, **fields):
    return client.chat.completions.create(model=model, messages=fields.pop("messages", ASK),
                                          max_tokens=fields.pop("max_tokens", 150),
                                          temperature=0, **fields)


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_responses_validate(client, model, name):
    reply = chat(client, model, messages=[{"role": "user", "content": "Describe someone."}],
                 response_format={"type": "json_schema", "json_schema": {
                     "name": "answer", "schema": SCHEMAS[name], "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_and_vllm_fields(client, model):
    reply = chat(client, model, response_format={"type": "json_object"}, messages=[{
        "role": "user", "content": "Give me a JSON object with the keys city and country "
                                   "for Paris."}])
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert chat(client, model, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}
                ).choices[0].message.content in ("yes", "no")
    assert chat(client, model, extra_body={"guided_choice": ["rain", "sun"]}
                ).choices[0].message.content in ("rain", "sun")
    code = chat(client, model, extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{2}"}}
                ).choices[0].message.content
    assert len(code) == 6 and code[:3].isupper() and code[3] == "-" and code[4:].isdigit()
    completion = client.completions.create(
        model=model, prompt="A person as JSON:", max_tokens=150, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_constraints_that_cannot_be_built_are_400s(client, model):
    cases = [
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}},
        {"extra_body": {"structured_outputs": {"regex": "(unclosed"}}},
        {"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}},
        {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
    ]
    for fields in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, model, **fields)
        assert refused.value.body["message"], fields
    assert chat(client, model, max_tokens=4).choices[0].message.content  # still serving


def test_a_named_tool_call_validates_against_its_schema(client, model):
    reply = chat(client, model, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_validate(client, model, parallel):
    reply = chat(client, model, tools=[WEATHER, TIME], tool_choice="required",
                 parallel_tool_calls=parallel, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_auto_extracts_calls_the_model_writes(client, model):
    """The model's output is fixed by a regex (as a fine-tuned model would write a call): the
    hermes parser finds the call, and the text around it is the content."""
    written = ('I will check. <tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    regex = written.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")
    reply = chat(client, model, tools=[WEATHER], tool_choice="auto",
                 extra_body={"structured_outputs": {"regex": regex}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    plain = chat(client, model, tools=[WEATHER], tool_choice="auto", max_tokens=32,
                 extra_body={"guided_choice": ["No call needed."]})
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == "No call needed."


@pytest.mark.parametrize("tool_choice", ["required", "named", "auto"])
def test_streamed_tool_call_deltas_reassemble_to_the_whole_answer(client, model, tool_choice):
    fields = {"tools": [WEATHER, TIME], "max_tokens": 200}
    if tool_choice == "named":
        fields["tool_choice"] = {"type": "function", "function": {"name": "get_time"}}
    elif tool_choice == "required":
        fields["tool_choice"] = "required"
    else:
        fields["extra_body"] = {"structured_outputs": {"regex": (
            r'Sure\. <tool_call>\{"name": "get_time", "arguments": \{"tz": "UTC"\}\}'
            r"</tool_call>")}}
    whole = chat(client, model, **fields).choices[0]
    content, calls, finish = "", {}, None
    for chunk in chat(client, model, stream=True, **fields):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += (part.function.name or "") if part.function else ""
            call["arguments"] += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert (content or None) == whole.message.content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(c["id"] for c in calls.values())


def test_tool_results_in_the_history_render(client, model):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    reply = chat(client, model, messages=messages, tools=[WEATHER], max_tokens=16)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 60  # the tools, the call and its result are all in
