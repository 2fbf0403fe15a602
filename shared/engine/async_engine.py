"""An engine in its own thread, driven from asyncio: the services are async at
the edges, the engine is synchronous at the core.

The engine thread owns the LLMEngine: every call from the event loop crosses a command queue
and runs between steps, so the engine is never touched by two threads. Each request's outputs
flow back through its own asyncio.Queue. A consumer that stops listening (a client that went
away, a cancelled RPC) aborts its request, so no sequence keeps its KV blocks for nobody.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pagewire.engine.llm_engine import LLMEngine, RequestIdInUseError
from pagewire.engine.sequence import Sequence
from pagewire.outputs import RequestOutput

T = TypeVar("T")
_STOP = object()


class EngineDeadError(RuntimeError):
    """The engine thread failed; in-flight requests end with this error."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine,
                 on_death: Callable[[BaseException], None] | None = None):
        """on_death(error) is called from the engine thread if it fails: the owner decides
        whether its process can go on (a worker cannot)."""
        self.engine = engine
        self._on_death = on_death
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="pagewire-engine", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    async def stop(self) -> None:
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # ---- called from the event loop ------------------------------------------------------

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs fn(engine) on the engine thread between steps and returns its result."""
        if self._error is not None:
            raise EngineDeadError(f"the engine thread failed: {self._error!r}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._commands.put((fn, loop, future))
        return await future

    async def stream(self, request_id: str,
                     submit: Callable[[LLMEngine], Any]) -> AsyncIterator[RequestOutput]:
        """Registers a stream for request_id, runs submit(engine) (add_request or import_kv)
        on the engine thread, then yields the request's outputs until it finishes. An import
        arrives with its first token already sampled: that output is yielded at once, not
        after the next step (it is the time to first token)."""
        if request_id in self._streams:  # checked before its outputs' queue is replaced
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        finished = False

        def submit_and_snapshot(engine: LLMEngine):
            submitted = submit(engine)
            if isinstance(submitted, Sequence) and submitted.output_token_ids:
                return engine.output_of(submitted)
            return None

        try:
            try:
                imported = await self.call(submit_and_snapshot)
            except RequestIdInUseError:
                finished = True  # the id is another request's (a reservation): not ours to free
                raise
            if imported is not None:
                finished = imported.finished
                yield imported
                if finished:
                    return
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._error is None:
                # The consumer left early (or submit failed): free whatever the engine holds.
                self._commands.put((lambda e: e.abort_request(request_id), None, None))

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Ends the request wherever it is and frees its blocks; its stream, if one is open,
        gets the final (finish_reason "abort") output and ends."""
        def abort_and_tell(engine: LLMEngine) -> RequestOutput | None:
            output = engine.abort_request(request_id)
            if output is not None:
                self._deliver(request_id, output)
            return output
        return await self.call(abort_and_tell)

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block):
                    return
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output.request_id, output)
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting caller
            self._error = exc
            dead = EngineDeadError(f"the engine thread failed: {exc!r}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
            self._fail_pending_commands(dead)
            if self._on_death is not None:
                self._on_death(exc)

    def _drain_commands(self, block: bool) -> bool:
        """Runs queued commands; waits for one when the engine is idle. False on stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            if command is _STOP:
                return False
            fn, loop, future = command
            try:
                result = fn(self.engine)
            except Exception as exc:  # the caller gets its own error; the engine goes on
                if loop is not None:
                    loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                if loop is not None:
                    loop.call_soon_threadsafe(_set_result, future, result)
            block = False

    def _deliver(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _fail_pending_commands(self, error: Exception) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not _STOP and command[1] is not None:
                command[1].call_soon_threadsafe(_set_exception, command[2], error)


def _set_result(future: asyncio.Future, result: object) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
