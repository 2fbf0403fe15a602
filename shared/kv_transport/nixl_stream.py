"""Streaming a prefilling sequence's blocks to a decode worker through NIXL, chunk by chunk.

A NIXL write reads the source blocks whenever UCX gets to them, not in order with the engine's
work as a mapped copy is: so the engine thread only queues each step's finished blocks here
(with a CUDA event when the cache is on a GPU), and one thread per transfer starts each write
once its step's KV is written, then polls the writes in flight (polling is what moves them:
agents run without NIXL's progress thread). Before the engine frees the sequence's blocks
(preempted, aborted) it calls `before_free`, which waits for every queued write to land, so
no write ever reads a block that another sequence has been given.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from pagewire.kv_transport.block_stream import BlockStream
from pagewire.kv_transport.nixl_agent import POLL_S, NixlEndpoint, NixlPeer, NixlTransferError

logger = logging.getLogger(__name__)
_END = object()
CANCEL_GRACE_S = 30.0  # a write NIXL cannot cancel is polled this long before we give up on it


class NixlStreamer(BlockStream):
    def __init__(self, endpoint: NixlEndpoint, peer: NixlPeer, dst_ids: list[int],
                 skip_blocks: int, timeout_s: float):
        super().__init__(dst_ids, skip_blocks, peer.num_blocks)
        self._endpoint, self._peer = endpoint, peer
        self._deadline = time.monotonic() + timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # sends queued or in flight (guarded by _idle)
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None  # started by the first send

    def _send(self, cache: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
        ready = None
        if cache.is_cuda:  # the step that wrote these blocks may still be running
            ready = torch.cuda.Event()
            ready.record()
        with self._idle:
            self._pending += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nixl-stream", daemon=True)
            self._thread.start()
        self._queue.put((ready, src_ids, dst_ids))

    def before_free(self) -> None:
        """Waits (on the engine thread) until nothing queued or in flight reads the blocks;
        the sends' own deadline bounds it."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def wait(self) -> None:
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()

    # ---- the transfer's thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._transfer()
        except BaseException as exc:  # a bug here must not leave the engine waiting
            logger.exception("NIXL streaming to %s failed", self._peer.agent_name)
            self.error = self.error or exc
            self._done(everything=True)

    def _transfer(self) -> None:
        in_flight: list[tuple[object, int]] = []  # (NIXL handle, bytes)
        busy_since, ending = 0.0, False
        while not ending or in_flight:
            try:
                item = self._queue.get(timeout=POLL_S if in_flight else None)
            except queue.Empty:
                item = None
            if item is _END:
                ending = True
            elif item is not None:
                ready, src_ids, dst_ids = item
                if ready is not None:  # the step's KV is written (not the bytes' time)
                    ready.synchronize()
                posted = time.perf_counter()  # UCX may move the bytes inside the post itself
                started = self._start(src_ids, dst_ids)
                if started is not None:
                    if not in_flight:
                        busy_since = posted
                    in_flight.append(started)
            if in_flight:
                in_flight = self._poll(in_flight)
                if not in_flight:
                    self.seconds += time.perf_counter() - busy_since

    def _start(self, src_ids: list[int], dst_ids: list[int]):
        """A started write, or None when the transfer has failed (the send is dropped)."""
        if self.error is None:
            try:
                return self._endpoint.start_write(self._peer, src_ids, dst_ids)
            except Exception as exc:  # noqa: BLE001 - reported to the request by `wait`
                self.error = exc
        self._done()
        return None

    def _poll(self, in_flight: list[tuple[object, int]]) -> list[tuple[object, int]]:
        still = []
        for handle, num_bytes in in_flight:
            state = self._endpoint.write_state(handle)
            if state == "PROC" and time.monotonic() > self._deadline:
                self.error = self.error or NixlTransferError(
                    f"NIXL write to {self._peer.agent_name} past its deadline")
                self._cancel(handle)
            elif state == "PROC":
                still.append((handle, num_bytes))
                continue
            else:
                if state == "DONE":
                    self.num_bytes += num_bytes
                else:
                    self.error = self.error or NixlTransferError(
                        f"NIXL write to {self._peer.agent_name} failed")
                self._endpoint.release(handle)
            self._done()
        return still

    def _cancel(self, handle) -> None:
        """Ends a write still under way; one NIXL cannot cancel is polled until it ends."""
        until = time.monotonic() + CANCEL_GRACE_S
        while True:
            try:
                self._endpoint.release(handle)
                return
            except Exception:  # noqa: BLE001 - NIXL raises when it cannot cancel yet
                if time.monotonic() > until:
                    logger.error("a NIXL write to %s could not be cancelled; its blocks are "
                                 "freed anyway", self._peer.agent_name)
                    return
                self._endpoint.write_state(handle)
                time.sleep(POLL_S)

    def _done(self, everything: bool = False) -> None:
        with self._idle:
            self._pending = 0 if everything else self._pending - 1
            self._idle.notify_all()
