"""One OpenAI request's choices: router tokens → incremental text → stop strings → events.

Each choice is its own router call and Detokenize stream. Closing a choice's generator (client
gone, stop string found) cancels its router call, which aborts the request downstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from pagewire.tokenizer.stop_strings import StopStringMatcher
from pagewire.v1 import common_pb2

from .backend import Backend
from .logprobs import TokenLogprob
from .metrics import ChoiceTimer

_FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None = None  # set on the choice's last event only
    logprobs: list[TokenLogprob] | None = None  # of the tokens behind `text`, when asked


@dataclass
class UsageCounter:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class ChoiceSpec:
    request_id: str
    sampling: common_pb2.SamplingOptions
    stop_strings: Sequence[str] = field(default_factory=tuple)


async def run_choice(backend: Backend, index: int, spec: ChoiceSpec, prompt_token_ids: list[int],
                     timeout_s: float, usage: UsageCounter,
                     timer: ChoiceTimer) -> AsyncIterator[ChoiceEvent]:
    call = backend.generate(spec.request_id, prompt_token_ids, spec.sampling, timeout_s)
    detokenizer = backend.detokenizer(prompt_token_ids)
    matcher = StopStringMatcher(spec.stop_strings) if spec.stop_strings else None
    first = True
    try:
        async for batch in call:
            timer.on_batch(batch)
            if first:
                usage.prompt_tokens = batch.prompt_tokens or len(prompt_token_ids)
                usage.cached_tokens = max(usage.cached_tokens, batch.cached_tokens)
                first = False
            usage.completion_tokens += len(batch.token_ids)
            finish = _FINISH_REASONS.get(batch.finish_reason)
            text = await detokenizer.step(list(batch.token_ids), finish is not None)
            logprobs = await _logprobs(backend, batch) if spec.sampling.HasField(
                "logprobs") else None
            if matcher is not None:
                text, stopped = matcher.feed(text)
                if stopped:
                    timer.on_finish("stop")
                    yield ChoiceEvent(index, text, "stop", logprobs)
                    await backend.abort(spec.request_id)
                    return
                if finish is not None:
                    text += matcher.flush()
            if finish is not None:
                timer.on_finish(finish)
            if text or finish is not None or logprobs:
                yield ChoiceEvent(index, text, finish, logprobs)
            if finish is not None:
                return
    except grpc.aio.AioRpcError as exc:
        timer.on_error(exc.code().name.lower())
        raise
    finally:
        timer.on_finish("abort")  # no-op unless the client left or a stop string ended it
        call.cancel()  # no-op when the stream ended; aborts downstream otherwise
        detokenizer.close()


async def _logprobs(backend: Backend, batch: common_pb2.TokenBatch) -> list[TokenLogprob]:
    ids = [*batch.token_ids, *(top.token_id for lp in batch.logprobs for top in lp.top)]
    spelled = dict(zip(ids, await backend.token_bytes(ids)))
    return [TokenLogprob(spelled[token_id], lp.logprob,
                         tuple((spelled[top.token_id], top.logprob) for top in lp.top))
            for token_id, lp in zip(batch.token_ids, batch.logprobs)]


async def merge_choices(choices: list[AsyncIterator[ChoiceEvent]]) -> AsyncIterator[ChoiceEvent]:
    """Events of all choices as they come; closing this cancels every choice still running."""
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(choice: AsyncIterator[ChoiceEvent]) -> None:
        try:
            async for event in choice:
                await queue.put(event)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
