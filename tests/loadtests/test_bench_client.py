"""The benchmark's client: streaming, timing and failures, against a faked server."""

from __future__ import annotations

import asyncio

import pytest
from tqdm import tqdm

from pagewire.bench.client import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    chat_body,
    completion_body,
    first_model,
    stream_request,
)
from pagewire.bench.config import BenchConfig, DatasetConfig, LoadConfig
from pagewire.bench.datasets import build_dataset
from pagewire.bench.load import Sender, run_load
from tests.loadtests.fake_server import MODEL, FakeServer


def run(coroutine):
    return asyncio.run(coroutine)


async def _stream(server: FakeServer, path: str, body: dict):
    async with server.client() as client:
        return await stream_request(client, path, body)


def test_completion_stream_is_timed_per_chunk():
    server = FakeServer(token_gap_s=0.01)
    body = completion_body(MODEL, [101, 102, 103], 5, ignore_eos=True)
    result = run(_stream(server, COMPLETIONS_PATH, body))
    assert result.ok, result.error
    assert result.output_tokens == 5 and result.prompt_tokens == 3 and result.cached_tokens == 1
    assert len(result.itl_s) == 4 and all(gap > 0.005 for gap in result.itl_s)
    assert 0.005 < result.ttft_s < result.latency_s
    assert result.tpot_s == pytest.approx((result.latency_s - result.ttft_s) / 4)
    assert result.text == "w0 w1 w2 w3 w4 "
    sent = server.bodies[0]
    assert sent["stream"] and sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] is True and sent["max_tokens"] == 5


def test_chat_role_chunk_is_not_the_first_token():
    server = FakeServer(token_gap_s=0.01)
    body = chat_body(MODEL, [{"role": "user", "content": "hi"}], 3, ignore_eos=False)
    result = run(_stream(server, CHAT_PATH, body))
    assert result.ok and result.output_tokens == 3 and len(result.itl_s) == 2
    assert result.ttft_s > 0.015  # the role chunk came after one gap, the first token after two
    assert "ignore_eos" not in server.bodies[0]


def test_http_error_is_a_failed_result_with_the_servers_message():
    result = run(_stream(FakeServer(fail_with=404), COMPLETIONS_PATH,
                         completion_body(MODEL, "x", 2, ignore_eos=True)))
    assert not result.ok and result.error == "HTTP 404: no such thing"


def test_extra_body_is_merged_into_every_request():
    server = FakeServer()
    body = completion_body(MODEL, "x", 2, ignore_eos=True, extra={"top_k": 5})
    run(_stream(server, COMPLETIONS_PATH, body))
    assert server.bodies[0]["top_k"] == 5


def test_first_model_is_the_default_model():
    async def ask():
        async with FakeServer().client() as client:
            return await first_model(client)
    assert run(ask()) == MODEL


def _run_load(server: FakeServer, dataset: DatasetConfig, load: LoadConfig):
    async def go():
        async with server.client() as client:
            sender = Sender(client, MODEL, BenchConfig("http://fake", dataset, load))
            with tqdm(disable=True) as progress:
                return await run_load(sender, build_dataset(dataset), load, progress)
    return run(go())


def test_multi_turn_carries_the_real_replies_as_history():
    server = FakeServer()
    dataset = DatasetConfig(name="multi-turn", num_prompts=2, turns=3, input_len=4,
                            output_len=2)
    results, _ = _run_load(server, dataset, LoadConfig())
    assert len(results) == 6 and all(r.ok for r in results)
    longest = max(server.bodies, key=lambda b: len(b["messages"]))["messages"]
    assert [m["role"] for m in longest] == ["user", "assistant"] * 2 + ["user"]
    assert longest[1]["content"] == "w0 w1 "


def test_max_concurrency_caps_requests_in_flight():
    server = FakeServer()
    dataset = DatasetConfig(num_prompts=8, input_len=4, output_len=3)
    results, duration_s = _run_load(server, dataset, LoadConfig(max_concurrency=2))
    assert all(r.ok for r in results) and duration_s > 0
    assert server.max_in_flight == 2


def test_failed_turn_skips_the_rest_of_its_conversation():
    dataset = DatasetConfig(name="multi-turn", num_prompts=1, turns=3, input_len=2,
                            output_len=2)
    results, _ = _run_load(FakeServer(fail_with=500), dataset, LoadConfig())
    assert [r.ok for r in results] == [False] * 3
    assert results[2].error == "not sent: an earlier turn failed"

