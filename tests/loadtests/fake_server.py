"""An OpenAI-compatible streaming server faked in-process (httpx.MockTransport): every
request is recorded, every reply streams `max_tokens` chunks a few milliseconds apart."""

from __future__ import annotations

import asyncio
import json

import httpx

MODEL = "fake-model"


class FakeServer:
    def __init__(self, token_gap_s: float = 0.002, fail_with: int | None = None) -> None:
        self.token_gap_s = token_gap_s
        self.fail_with = fail_with
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle),
                                 base_url="http://fake")

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.fail_with:
            return httpx.Response(self.fail_with, json={"error": {
                "message": "no such thing", "type": "invalid_request_error"}})
        return httpx.Response(200, content=self._events(body),
                              headers={"content-type": "text/event-stream"})

    async def _events(self, body: dict):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        chat = "messages" in body
        if chat:
            await asyncio.sleep(self.token_gap_s)
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(body["max_tokens"]):
            await asyncio.sleep(self.token_gap_s)
            text = f"w{i} "
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0,
                                                                            "text": text}
            yield _sse({"choices": [choice]})
        prompt = body.get("prompt") or body.get("messages")
        usage = {"prompt_tokens": len(prompt), "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 1}}
        yield _sse({"choices": [], "usage": usage})
        self.in_flight -= 1  # here, not in a `finally`: nothing closes a mocked stream early
        yield b"data: [DONE]\n\n"


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()
