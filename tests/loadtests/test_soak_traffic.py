"""The soak's traffic (pagewire.bench.soak_traffic) against a server faked in-process: every way
a request can end gets the right outcome, and the mix and the load shapes do what they say."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest

from pagewire.bench.datasets import BenchRequest
from pagewire.bench.soak_traffic import (
    MixConfig,
    Planned,
    RequestMix,
    Sender,
    drain,
    measure_capacity,
    send_poisson,
)

COMPLETION = BenchRequest(output_len=4, prompt_len=3, prompt=[101, 102, 103])
CHAT = BenchRequest(output_len=4, prompt_len=2, user="hello there", system="be brief")


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def handler(scenario: str):
    async def events(body: dict):
        chat = "messages" in body
        if chat:
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.001)
            if scenario == "error event" and i == 2:
                yield sse({"error": {"message": "decode worker lost", "type": "server_error"}})
                yield sse("[DONE]")
                return
            finish = "length" if i == body["max_tokens"] - 1 else None
            choice = ({"index": 0, "delta": {"content": f"w{i}"}, "finish_reason": finish}
                      if chat else {"index": 0, "text": f"w{i}", "finish_reason": finish})
            yield sse({"choices": [choice]})
        if scenario == "cut":
            return
        yield sse({"choices": [], "usage": {"prompt_tokens": 3,
                                            "completion_tokens": body["max_tokens"]}})
        yield sse("[DONE]")

    async def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if scenario == "overloaded":
            return httpx.Response(503, json={"error": {"message": "too busy",
                                                       "type": "server_error"}})
        if scenario == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        if scenario == "silent":
            await asyncio.sleep(5)
        if not body["stream"]:
            return httpx.Response(200, json={
                "choices": [{"index": 0, "text": "abcd", "finish_reason": "length"}],
                "usage": {"completion_tokens": body["max_tokens"]}})
        return httpx.Response(200, content=events(body),
                              headers={"content-type": "text/event-stream"})

    return handle


def send(scenario: str, mode: str = "stream", request: BenchRequest = COMPLETION):
    async def go():
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler(scenario)),
                                   base_url="http://fake")
        async with client:
            sender = Sender(client, "m", MixConfig(disconnect_after_chunks=2),
                            request_timeout_s=0.5)
            return await sender.send(Planned(mode, "random", request), "soak")

    return asyncio.run(go())


@pytest.mark.parametrize("request_", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_a_full_stream_is_completed_with_its_latencies(request_):
    outcome = send("ok", request=request_)
    assert outcome.status == "completed" and outcome.reason == ""
    assert outcome.finish_reason == "length" and outcome.output_tokens == 4
    assert 0 < outcome.ttft_s < outcome.e2e_s and outcome.tpot_s > 0


def test_a_non_streamed_answer_is_completed_with_e2e_only():
    outcome = send("ok", mode="non-stream")
    assert outcome.status == "completed" and outcome.finish_reason == "length"
    assert outcome.e2e_s > 0 and outcome.ttft_s is None and outcome.output_tokens == 4


def test_a_disconnect_closes_the_stream_after_a_few_chunks():
    outcome = send("ok", mode="disconnect")
    assert outcome.status == "disconnected" and outcome.finish_reason is None


@pytest.mark.parametrize("scenario, status, reason", [
    ("error event", "failed", "stream error: decode worker lost"),
    ("overloaded", "failed", "HTTP 503: too busy"),
    ("cut", "lost", "the stream ended before [DONE]"),
    ("refused", "lost", "ConnectError: connection refused"),
    ("silent", "lost", "no final outcome within 0.5 s"),
])
def test_every_other_end_is_failed_with_the_servers_reason_or_lost(scenario, status, reason):
    outcome = send(scenario)
    assert (outcome.status, outcome.reason) == (status, reason)


def test_the_mix_is_seeded_and_keeps_its_fractions():
    config = MixConfig(shared_prefix_fraction=0.5, non_stream_fraction=0.2,
                       disconnect_fraction=0.1, seed=3)
    mix = RequestMix(config)
    planned = [mix.next() for _ in range(1000)]
    again = RequestMix(config)
    assert [again.next() for _ in range(3)] == planned[:3]  # same seed, same requests
    modes = Counter(p.mode for p in planned)
    assert 60 < modes["disconnect"] < 140 and 150 < modes["non-stream"] < 250
    assert 400 < sum(p.dataset == "shared-prefix" for p in planned) < 600
    assert all(p.request.is_chat == (p.dataset == "shared-prefix") for p in planned)
    assert len({str(p.request.prompt) for p in planned if p.dataset == "random"}) > 400
    assert "disconnect" not in {RequestMix(config).next(allow_disconnect=False).mode
                                for _ in range(200)}


def test_capacity_then_poisson_arrivals_all_end():
    async def go():
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler("ok")),
                                   base_url="http://fake")
        async with client:
            mix = MixConfig(input_len=4, output_len=3, prefix_len=4, disconnect_fraction=0.2)
            sender = Sender(client, "m", mix, request_timeout_s=5)
            capacity = await measure_capacity(sender, RequestMix(mix), 2, 0.3)
            tasks = await send_poisson(sender, RequestMix(mix), 100, 0.3)
            assert await drain(tasks, 5) == 0
            return capacity, sender.outcomes

    capacity, outcomes = asyncio.run(go())
    assert capacity["capacity_rps"] > 0 and capacity["failed"] == 0
    soak = [o for o in outcomes if o.phase == "soak"]
    assert 10 < len(soak) < 60
    assert {o.status for o in outcomes} <= {"completed", "disconnected"}
