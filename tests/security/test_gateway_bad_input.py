"""Hand-written bad input to the gateway: wrong types, huge and negative numbers, empty and
oversized prompts, invalid UTF-8 and JSON, stop lists, unknown fields, n and logprobs at and past
their limits, max_tokens past the context. Each gets a 4xx in OpenAI's error shape naming the
field (or a sensible success), and the stack keeps serving with every KV block free afterwards.
"""

from __future__ import annotations

import dataclasses
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pagewire.services.gateway.config import GatewayConfig
from pagewire.services.gateway.errors import install_error_handlers

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]
OK = 200


def completion(**fields) -> dict:
    return {"prompt": "Hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


def raw_completion(fields: bytes) -> bytes:
    return b'{"model": "MODEL", "max_tokens": 2, ' + fields + b"}"


# (what, route, JSON body or raw bytes, expected status, the error's param or its first part)
CASES = [
    # wrong types
    ("max_tokens as a word", COMPLETIONS, completion(max_tokens="many"), 400, "max_tokens"),
    ("max_tokens as a numeric string", COMPLETIONS, completion(max_tokens="3"), 400,
     "max_tokens"),
    ("max_tokens as a boolean", COMPLETIONS, completion(max_tokens=True), 400, "max_tokens"),
    ("max_tokens as a fraction", COMPLETIONS, completion(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens as 2.0 is 2", COMPLETIONS, completion(max_tokens=2.0), OK, None),
    ("temperature as a word", COMPLETIONS, completion(temperature="hot"), 400, "temperature"),
    ("stream as a word", COMPLETIONS, completion(stream="yes"), 400, "stream"),
    ("n as a string", COMPLETIONS, completion(n="2"), 400, "n"),
    ("prompt as a number", COMPLETIONS, completion(prompt=5), 400, "prompt"),
    ("prompt as a list of strings", COMPLETIONS, completion(prompt=["a", "b"]), 400, "prompt"),
    ("prompt as nested lists", COMPLETIONS, completion(prompt=[[1, 2]]), 400, "prompt"),
    ("stop as a list of numbers", COMPLETIONS, completion(stop=[5]), 400, "stop"),
    ("model as null", COMPLETIONS, completion(model=None), 400, "model"),
    ("user as a number", COMPLETIONS, completion(user=5), 400, "user"),
    ("echo as 0", COMPLETIONS, completion(echo=0), 400, "echo"),
    ("messages as a string", CHAT, chat(messages="Hi"), 400, "messages"),
    ("message content as a number", CHAT, chat(messages=[{"role": "user", "content": 3}]), 400,
     "messages"),
    ("message content as text parts", CHAT, chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]), OK, None),
    ("message content as an image part", CHAT, chat(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages"),
    ("a user message with tool calls but no content", CHAT, chat(messages=[
        {"role": "user", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": ""}}]
         }]), 400, "messages"),
    ("a tool named with a space", CHAT, chat(tools=[
        {"type": "function", "function": {"name": "get weather"}}]), 400, "tools"),
    ("tool_choice of an unknown kind", CHAT, chat(tool_choice="always"), 400, "tool_choice"),
    ("response_format of an unknown type", CHAT, chat(response_format={"type": "xml"}), 400,
     "response_format"),
    ("a schema that is not an object", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": 5}}), 400,
     "response_format"),
    ("an empty regex", CHAT, chat(structured_outputs={"regex": ""}), 400, "structured_outputs"),
    ("message without content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]), 400,
     "messages"),
    ("chat logprobs as a number", CHAT, chat(logprobs=5), 400, "logprobs"),
    ("developer role is a system message", CHAT, chat(messages=[
        {"role": "developer", "content": "Be brief."}, *USER]), OK, None),
    # huge and negative numbers
    ("max_tokens negative", COMPLETIONS, completion(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens zero", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens"),
    ("max_tokens 10**30", COMPLETIONS, completion(max_tokens=10**30), 400, "max_tokens"),
    ("n negative", COMPLETIONS, completion(n=-1), 400, "n"),
    ("n 10**20", COMPLETIONS, completion(n=10**20), 400, "n"),
    ("temperature negative", COMPLETIONS, completion(temperature=-1), 400, "temperature"),
    ("temperature 1e308", COMPLETIONS, completion(temperature=1e308), 400, "temperature"),
    ("top_k -2", COMPLETIONS, completion(top_k=-2), 400, "top_k"),
    ("top_k past int32", COMPLETIONS, completion(top_k=2**40), 400, "top_k"),
    ("top_p zero", COMPLETIONS, completion(top_p=0), 400, "top_p"),
    ("seed negative", COMPLETIONS, completion(seed=-1), 400, "seed"),
    ("seed 2**64", COMPLETIONS, completion(seed=2**64), 400, "seed"),
    ("logprobs negative", COMPLETIONS, completion(logprobs=-1), 400, "logprobs"),
    ("token id negative", COMPLETIONS, completion(prompt=[-1]), 400, "prompt"),
    ("token id 2**40", COMPLETIONS, completion(prompt=[2**40]), 400, "prompt"),
    ("temperature NaN", COMPLETIONS, raw_completion(b'"prompt": "Hi", "temperature": NaN'), 400,
     "temperature"),
    ("top_p Infinity", COMPLETIONS, raw_completion(b'"prompt": "Hi", "top_p": Infinity'), 400,
     "top_p"),
    ("penalty 1e400", COMPLETIONS, raw_completion(b'"prompt": "Hi", "presence_penalty": 1e400'),
     400, "presence_penalty"),
    # empty and oversized prompts
    ("empty prompt", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("empty token list", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("no messages", CHAT, chat(messages=[]), 400, "messages"),
    ("empty message content", CHAT, chat(messages=[{"role": "user", "content": ""}]), OK, None),
    ("prompt of 9000 token ids", COMPLETIONS, completion(prompt=[1] * 9000), 400, "prompt"),
    ("prompt of 1 MB text", COMPLETIONS, completion(prompt="word " * 200_000), 400, "prompt"),
    ("chat of 5000 messages", CHAT, chat(messages=USER * 5000), 400, "messages"),
    # invalid UTF-8 and invalid JSON
    ("invalid UTF-8 in a string", COMPLETIONS, raw_completion(b'"prompt": "\xff\xfe Hi"'), 400,
     None),
    ("a body of invalid UTF-8", COMPLETIONS, b"\xff\xfe\x00\x00", 400, None),
    ("lone surrogate in the prompt", COMPLETIONS, raw_completion(b'"prompt": "\\ud800"'), 400,
     "prompt"),
    ("lone surrogate in a message", CHAT,
     b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages"),
    ("lone surrogate in a stop string", COMPLETIONS,
     raw_completion(b'"prompt": "Hi", "stop": ["\\ud800"]'), 400, "stop"),
    ("NUL character in the prompt", COMPLETIONS, completion(prompt="a\u0000b"), OK, None),
    ("truncated JSON", COMPLETIONS, b'{"model": "MODEL", "prompt": "Hi', 400, None),
    ("JSON nested 100,000 deep", COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("empty body", COMPLETIONS, b"", 400, None),
    ("body null", COMPLETIONS, b"null", 400, None),
    ("body a list", COMPLETIONS, b"[]", 400, None),
    # stop strings
    ("10,000 stop strings", COMPLETIONS, completion(stop=[f"s{i}" for i in range(10_000)]), 400,
     "stop"),
    ("17 stop strings", COMPLETIONS, completion(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("a stop string of 100,000 characters", COMPLETIONS, completion(stop="x" * 100_000), 400,
     "stop"),
    ("an empty stop string", COMPLETIONS, completion(stop=""), 400, "stop"),
    ("an empty stop string in a list", COMPLETIONS, completion(stop=["a", ""]), 400, "stop"),
    ("16 stop strings of 256 characters", COMPLETIONS,
     completion(stop=[f"{i:02d}" + "x" * 254 for i in range(16)]), OK, None),
    # unknown fields
    ("an unknown field", COMPLETIONS, completion(bogus_field=1), 400, "bogus_field"),
    ("logit_bias (not supported)", COMPLETIONS, completion(logit_bias={"1": 5}), 400,
     "logit_bias"),
    ("an unknown field in a message", CHAT,
     chat(messages=[{"role": "user", "content": "Hi", "mood": "sad"}]), 400, "messages"),
    ("an unknown stream option", COMPLETIONS,
     completion(stream=True, stream_options={"bogus": 1}), 400, "stream_options"),
    ("echo (not supported)", COMPLETIONS, completion(echo=True), 400, "echo"),
    # n and logprobs at and past their limits
    ("n 8 (the limit)", COMPLETIONS, completion(n=8), OK, None),
    ("n 9", COMPLETIONS, completion(n=9), 400, "n"),
    ("logprobs 20 (the limit)", COMPLETIONS, completion(logprobs=20), OK, None),
    ("logprobs 21", COMPLETIONS, completion(logprobs=21), 400, "logprobs"),
    ("top_logprobs 20 (the limit)", CHAT, chat(logprobs=True, top_logprobs=20), OK, None),
    ("top_logprobs 21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("n 8 with 20 logprobs, streamed", CHAT,
     chat(n=8, logprobs=True, top_logprobs=20, stream=True), OK, None),
    # max_tokens past the context
    ("max_tokens of the whole context", COMPLETIONS, completion(max_tokens=1024), 400,
     "max_tokens"),  # the workers' 1024, not the model's 8192: the tokenizer passes it on
    ("max_tokens within the model's context, past the workers'", COMPLETIONS,
     completion(max_tokens=2000), 400, "max_tokens"),
    ("max_completion_tokens 10**12", CHAT, chat(max_completion_tokens=10**12), 400,
     "max_tokens"),
    ("prompt past the worker's context", COMPLETIONS, completion(prompt=[1] * 2000), 400,
     "prompt"),
]


def send(stack, model: str, route: str, body: dict | bytes,
         headers: dict | None = None) -> httpx.Response:
    url = f"http://127.0.0.1:{stack.port}{route}"
    if isinstance(body, bytes):
        return httpx.post(url, content=body.replace(b"MODEL", model.encode()), timeout=60,
                          headers=headers or {"content-type": "application/json"})
    return httpx.post(url, json={"model": model, **body}, timeout=60)


def assert_openai_error(reply: httpx.Response, status: int, param: str | None) -> dict:
    assert reply.status_code == status, reply.text[:500]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"].split(".")[0] == param, error
    return error


@pytest.mark.parametrize("what, route, body, status, param", CASES,
                         ids=[case[0] for case in CASES])
def test_bad_input_gets_a_clear_answer(stack, model, what, route, body, status, param):
    reply = send(stack, model, route, body)
    if status == OK:
        assert reply.status_code == OK, reply.text[:500]
    else:
        assert_openai_error(reply, status, param)


def test_wrong_method_and_unknown_route_are_in_openai_shape(stack):
    base = f"http://127.0.0.1:{stack.port}"
    assert_openai_error(httpx.get(base + COMPLETIONS, timeout=10), 405, None)
    assert_openai_error(httpx.post(base + "/v1/nothing", json={}, timeout=10), 404, None)


def test_a_body_over_the_limit_is_413_before_it_is_read(stack, model):
    body = completion(prompt="x" * (9 << 20))  # over the default 8 MiB
    assert_openai_error(send(stack, model, COMPLETIONS, body), 413, None)


@pytest.mark.parametrize("route, body, param", [
    (COMPLETIONS, completion(prompt="word " * (1 << 20)), "prompt"),  # 5 MiB
    (CHAT, chat(messages=[{"role": "user", "content": "word " * (1 << 19)}] * 2), "messages"),
])
def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(stack, model, route,
                                                                       body, param):
    """Bytes over max_token_bytes bound the tokens from below: "at least" comes only from
    that check, which answers before the tokenizer spends seconds on megabytes."""
    start = time.monotonic()
    error = assert_openai_error(send(stack, model, route, body), 400, param)
    assert "maximum context length" in error["message"] and "at least" in error["message"]
    assert time.monotonic() - start < 5


@pytest.fixture(scope="module")
def limited_port(stack):
    config = dataclasses.replace(stack.gateway_config, max_n=2, max_stop_strings=2,
                                 max_stop_string_chars=4)
    return stack._run(stack.start_gateway(config))


@pytest.mark.parametrize("fields, param, message", [
    ({"n": 3}, "n", "at most 2 choices"),
    ({"stop": ["a", "b", "c"]}, "stop", "at most 2"),
    ({"stop": "abcde"}, "stop", "at most 4"),
], ids=["n", "stop strings", "stop string length"])
def test_operator_limits_are_config_and_give_clear_errors(limited_port, model, fields, param,
                                                          message):
    reply = httpx.post(f"http://127.0.0.1:{limited_port}{COMPLETIONS}",
                       json={"model": model, **completion(**fields)}, timeout=60)
    assert message in assert_openai_error(reply, 400, param)["message"]
    within = completion(n=2, stop=["ab", "cd"])
    reply = httpx.post(f"http://127.0.0.1:{limited_port}{COMPLETIONS}",
                       json={"model": model, **within}, timeout=60)
    assert reply.status_code == OK, reply.text


@pytest.mark.parametrize("fields", [{"max_n": 0}, {"max_n": 129}, {"max_stop_strings": -1},
                                    {"max_stop_string_chars": 0}, {"max_body_bytes": 0}])
def test_bad_limits_fail_at_start(fields):
    with pytest.raises(ValueError):
        GatewayConfig(**fields)


def test_the_stack_keeps_serving_and_frees_every_block(stack, model):
    reply = send(stack, model, COMPLETIONS, completion(temperature=0))
    assert reply.status_code == OK and reply.json()["choices"][0]["finish_reason"]
    for stats in stack.worker_stats():
        assert stats.kv_blocks_free == stats.kv_blocks_total, stats
        assert stats.running == 0 and stats.waiting == 0


def test_a_bug_in_the_gateway_is_a_500_in_openai_shape_that_tells_nothing_inside():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bug")
    async def bug():
        raise RuntimeError("secret detail")

    reply = TestClient(app, raise_server_exceptions=False).get("/bug")
    assert "secret detail" not in assert_openai_error(reply, 500, None)["message"]
