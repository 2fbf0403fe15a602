"""An answer's body from its choices' events: one JSON object, or an SSE stream.

The stream sends the first event before its headers go out, so a request that fails at once is
a proper HTTP error; later failures become an error event, and `data: [DONE]` always ends it.
A client that leaves, before the first token or during a non-streamed answer, cancels the
choices at once (their router calls, and with them the work on every worker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import responses
from .errors import error_body, from_grpc
from .generation import ChoiceEvent, UsageCounter
from .logprobs import chat_logprobs, completion_logprobs
from .tool_output import ToolOutput

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left: nobody reads it


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
        self._offsets[event.index] += sum(len(token) for token in shaped["tokens"])
        return shaped


@dataclass
class Answer:
    """What shapes one request's answer, whatever the events turn out to be."""

    request_id: str
    model: str
    chat: bool
    n: int
    include_usage: bool
    shape: LogprobShaper | None
    tools: ToolOutput | None = None  # a chat whose text may hold tool calls
    usage: UsageCounter = field(default_factory=UsageCounter)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._tool_streams = [self.tools.stream() for _ in range(self.n)] if self.tools else []

    def chunk(self, event: ChoiceEvent, delta: dict | None = None) -> str:
        logprobs = self.shape(event) if self.shape is not None and delta is None else None
        if self.chat and self._tool_streams and delta is None:
            deltas = self._tool_streams[event.index].deltas(event.text, event.finish_reason)
            return "".join(responses.sse(responses.chat_chunk(
                self.request_id, self.model, self.created, event.index, part, finish,
                logprobs if i == 0 else None)) for i, (part, finish) in enumerate(deltas))
        if self.chat:
            payload = responses.chat_chunk(
                self.request_id, self.model, self.created, event.index,
                delta if delta is not None else {"content": event.text}, event.finish_reason,
                logprobs)
        else:
            payload = responses.completion_chunk(self.request_id, self.model, self.created,
                                                 event.index, event.text, event.finish_reason,
                                                 logprobs)
        return responses.sse(payload)


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, awaitable):
    """The awaitable's result; if the client leaves first, it is cancelled and
    ClientDisconnected is raised."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnected
    return work.result()


async def _until_disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, events: AsyncIterator[ChoiceEvent],
                  answer: Answer) -> Response:
    try:
        body = await unless_disconnected(request, _collect(events, answer))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(body)


async def _collect(events: AsyncIterator[ChoiceEvent], answer: Answer) -> dict:
    n = answer.n
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
    shape = answer.shape
    logprobs = [None if shape is None else shape(ChoiceEvent(i, "", logprobs=tokens[i]))
                for i in range(n)]
    if not answer.chat:
        return responses.completion(answer.request_id, answer.model, texts, finish_reasons,
                                    answer.usage.as_dict(), logprobs)
    messages = []
    for i in range(n):
        if answer.tools is None:
            messages.append({"role": "assistant", "content": texts[i]})
        else:
            message, finish_reasons[i] = answer.tools.message(texts[i], finish_reasons[i])
            messages.append(message)
    return responses.chat_completion(answer.request_id, answer.model, messages, finish_reasons,
                                     answer.usage.as_dict(), logprobs)


async def stream(request: Request, events: AsyncIterator[ChoiceEvent],
                 answer: Answer) -> Response:
    try:  # the first event before the headers, so an early failure is a proper HTTP error
        first = await unless_disconnected(request, _next_or_none(events))
    except ClientDisconnected:
        await events.aclose()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException:
        await events.aclose()
        raise

    async def body_chunks() -> AsyncIterator[str]:
        try:
            if answer.chat:  # the role first, once per choice
                for index in range(answer.n):
                    yield answer.chunk(ChoiceEvent(index, ""),
                                       {"role": "assistant", "content": ""})
            if first is not None:
                yield answer.chunk(first)
            async for event in events:
                yield answer.chunk(event)
            if answer.include_usage:
                yield responses.sse(responses.usage_chunk(
                    answer.request_id, answer.model, answer.created, answer.chat,
                    answer.usage.as_dict()))
        except grpc.aio.AioRpcError as exc:  # headers are sent: report in the stream
            error = from_grpc(exc)
            yield responses.sse(error_body(error.message, error.type, code=error.code))
        finally:
            await events.aclose()  # client gone or done: cancels router calls still running
        yield responses.SSE_DONE

    return StreamingResponse(body_chunks(), media_type="text/event-stream")


async def _next_or_none(events: AsyncIterator[ChoiceEvent]) -> ChoiceEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
