"""Writing blocks into a peer's KV cache that this process has mapped (shm, cuda_ipc).

Both caches have the engine's layout [layers, 2, num_blocks, block_size, kv_heads, head_dim],
so a run of consecutive blocks is one strided copy covering every layer, keys and values. The
destination blocks are reserved for this request on the peer, so nothing else writes them.
The engine drives a `BlockStreamer` as the prompt's chunks are computed.
"""

from __future__ import annotations

import threading
import time

import torch

from pagewire.kv_transport import block_runs


def check_peer_cache(local: torch.Tensor, peer: torch.Tensor) -> None:
    """A mapped peer cache must have this cache's layout but for its number of blocks."""
    if local.dtype != peer.dtype or local.shape[:2] != peer.shape[:2] or \
            local.shape[3:] != peer.shape[3:]:
        raise ValueError(f"the peer's KV cache {tuple(peer.shape)} {peer.dtype} does not fit "
                         f"this one's {tuple(local.shape)} {local.dtype}")


class BlockStreamer:
    """Streams a prefilling sequence's blocks into a peer's mapped cache as its chunks are
    computed: the engine calls `on_computed` on its own thread right after each step that
    advanced the sequence, so a long prompt's early blocks travel while its later chunks
    compute, and the last ones leave in the step that finishes the prompt, not after it.

    The copies run where the step ran, in order with it: on the engine thread on the CPU, on
    the engine's stream on a GPU. So a block is read only once its KV is written, and never
    after the scheduler hands it to another sequence (a preempted sequence frees its blocks;
    the copies already made hold that KV, and recomputing continues after them).
    """

    def __init__(self, peer_cache: torch.Tensor, dst_ids: list[int], skip_blocks: int):
        if any(not 0 <= i < peer_cache.shape[2] for i in dst_ids):
            raise ValueError(f"destination blocks outside the peer's {peer_cache.shape[2]}")
        self.peer_cache = peer_cache
        self.dst_ids = dst_ids
        self.skip_blocks = skip_blocks
        self.num_sent = 0  # of dst_ids
        self.num_bytes = 0
        self.seconds = 0.0  # spent copying (on a GPU: measured with events at `wait`)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._done: torch.cuda.Event | None = None
        self.error: Exception | None = None
        self._lock = threading.Lock()  # the engine thread copies; another thread stops it
        self._stopped = False

    def on_computed(self, cache: torch.Tensor, block_table: list[int], num_computed: int,
                    num_prompt_tokens: int) -> None:
        """Sends the blocks the step completed: full ones, and the partial last one once the
        whole prompt is computed. Never raises (it runs inside the engine's step): a failure
        is kept in `error` and ends the streaming."""
        with self._lock:
            if self.error is not None or self._stopped:
                return
            try:
                self._send(cache, block_table, num_computed, num_prompt_tokens)
            except Exception as exc:  # noqa: BLE001 - reported to the request, not the engine
                self.error = exc

    def stop(self) -> None:
        """No copy starts after this returns (a copy under way finishes first): then `wait`
        covers every byte that will ever reach the peer's blocks."""
        with self._lock:
            self._stopped = True

    def _send(self, cache: torch.Tensor, block_table: list[int], num_computed: int,
              num_prompt_tokens: int) -> None:
        block_size = cache.shape[3]
        if num_computed >= num_prompt_tokens:
            upto = -(-num_prompt_tokens // block_size)
        else:
            upto = num_computed // block_size
        first = self.skip_blocks + self.num_sent
        if upto <= first:
            return
        src_ids, dst_ids = block_table[first:upto], self.dst_ids[self.num_sent:upto -
                                                               self.skip_blocks]
        if cache.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.num_bytes += _copy_runs(cache, src_ids, self.peer_cache, dst_ids)
            end.record()
            self._events.append((start, end))
            self._done = end
        else:
            started = time.perf_counter()
            self.num_bytes += _copy_runs(cache, src_ids, self.peer_cache, dst_ids)
            self.seconds += time.perf_counter() - started
        self.num_sent += len(src_ids)

    @property
    def complete(self) -> bool:
        return self.num_sent == len(self.dst_ids)

    def wait(self) -> None:
        """Blocks until every copy issued has landed (not on the engine thread)."""
        if self._done is not None:
            self._done.synchronize()
            self.seconds = sum(s.elapsed_time(e) for s, e in self._events) / 1000


def _copy_runs(src_cache: torch.Tensor, src_ids: list[int], dst_cache: torch.Tensor,
               dst_ids: list[int]) -> int:
    for src, dst, length in block_runs(src_ids, dst_ids):
        dst_cache[:, :, dst:dst + length].copy_(src_cache[:, :, src:src + length],
                                                non_blocking=True)
    return len(src_ids) * src_cache[:, :, 0].numel() * src_cache.element_size()
