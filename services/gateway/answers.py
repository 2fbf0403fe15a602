"""An answer's body from its choices' events: one JSON object, or an SSE stream.

The stream sends the first event before its headers go out, so a request that fails at once is
a proper HTTP error; later failures become an error event, and `data: [DONE]` always ends it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from fastapi.responses import StreamingResponse

from . import responses
from .errors import error_body, from_grpc
from .generation import ChoiceEvent, UsageCounter
from .logprobs import chat_logprobs, completion_logprobs, text_length
from .protocol import SamplingFields


class LogprobShaper:
    """Shapes each event's logprobs; completions count text_offset on per choice."""

    def __init__(self, chat: bool, n: int) -> None:
        self._chat = chat
        self._offsets = [0] * n

    def __call__(self, event: ChoiceEvent) -> dict:
        tokens = event.logprobs or []
        if self._chat:
            return chat_logprobs(tokens)
        shaped = completion_logprobs(tokens, self._offsets[event.index])
        self._offsets[event.index] += text_length(tokens)
        return shaped


async def collect(events: AsyncIterator[ChoiceEvent], request_id: str, model: str, n: int,
                   usage: UsageCounter, chat: bool, shape: LogprobShaper | None) -> dict:
    texts = [""] * n
    finish_reasons: list[str | None] = [None] * n
    tokens: list[list] = [[] for _ in range(n)]
    try:
        async for event in events:
            texts[event.index] += event.text
            finish_reasons[event.index] = event.finish_reason or finish_reasons[event.index]
            tokens[event.index].extend(event.logprobs or [])
    finally:
        await events.aclose()
    logprobs = [None if shape is None else shape(ChoiceEvent(i, "", logprobs=tokens[i]))
                for i in range(n)]
    build = responses.chat_completion if chat else responses.completion
    return build(request_id, model, texts, finish_reasons, usage.as_dict(), logprobs)


async def stream(events: AsyncIterator[ChoiceEvent], request_id: str, model: str,
                  body: SamplingFields, usage: UsageCounter, chat: bool,
                  shape: LogprobShaper | None) -> StreamingResponse:
    created = int(time.time())
    try:  # the first event before the headers, so an early failure is a proper HTTP error
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise

    def chunk(event: ChoiceEvent, delta: dict | None = None) -> str:
        logprobs = shape(event) if shape is not None and delta is None else None
        if chat:
            payload = responses.chat_chunk(request_id, model, created, event.index,
                                           delta if delta is not None else
                                           {"content": event.text}, event.finish_reason,
                                           logprobs)
        else:
            payload = responses.completion_chunk(request_id, model, created, event.index,
                                                 event.text, event.finish_reason, logprobs)
        return responses.sse(payload)

    async def body_chunks() -> AsyncIterator[str]:
        try:
            if chat:  # the role first, once per choice
                for index in range(body.n):
                    yield chunk(ChoiceEvent(index, ""), {"role": "assistant", "content": ""})
            if first is not None:
                yield chunk(first)
            async for event in events:
                yield chunk(event)
            if body.include_usage:
                yield responses.sse(responses.usage_chunk(request_id, model, created, chat,
                                                          usage.as_dict()))
        except grpc.aio.AioRpcError as exc:  # headers are sent: report in the stream
            error = from_grpc(exc)
            yield responses.sse(error_body(error.message, error.type, code=error.code))
        finally:
            await events.aclose()  # client gone or done: cancels router calls still running
        yield responses.SSE_DONE

    return StreamingResponse(body_chunks(), media_type="text/event-stream")
