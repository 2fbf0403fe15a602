"""OpenAI response bodies and SSE chunks, as plain dicts."""

from __future__ import annotations

import json
import time

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def completion(request_id: str, model: str, texts: list[str], finish_reasons: list[str | None],
               usage: dict, logprobs: list[dict | None]) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "usage": usage,
            "choices": [{"index": i, "text": text, "finish_reason": finish_reasons[i],
                         "logprobs": logprobs[i]} for i, text in enumerate(texts)]}


def chat_completion(request_id: str, model: str, messages: list[dict],
                    finish_reasons: list[str | None], usage: dict,
                    logprobs: list[dict | None]) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": usage,
            "choices": [{"index": i, "finish_reason": finish_reasons[i], "logprobs": logprobs[i],
                         "message": message} for i, message in enumerate(messages)]}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                         "logprobs": logprobs}]}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": index, "delta": delta,
                                         "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(request_id: str, model: str, created: int, chat: bool, usage: dict) -> dict:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model,
            "choices": [], "usage": usage}
