"""Writing blocks into a peer's KV cache that this process has mapped (shm, cuda_ipc).

Both caches have the engine's layout [layers, 2, num_blocks, block_size, kv_heads, head_dim],
so a run of consecutive blocks is one strided copy covering every layer, keys and values. The
destination blocks are reserved for this request on the peer, so nothing else writes them.
The engine drives a `BlockStreamer` as the prompt's chunks are computed (block_stream.py).
"""

from __future__ import annotations

import time

import torch

from pagewire.kv_transport import block_runs
from pagewire.kv_transport.block_stream import BlockStream


def check_peer_cache(local: torch.Tensor, peer: torch.Tensor) -> None:
    """A mapped peer cache must have this cache's layout but for its number of blocks."""
    if local.dtype != peer.dtype or local.shape[:2] != peer.shape[:2] or \
            local.shape[3:] != peer.shape[3:]:
        raise ValueError(f"the peer's KV cache {tuple(peer.shape)} {peer.dtype} does not fit "
                         f"this one's {tuple(local.shape)} {local.dtype}")


class BlockStreamer(BlockStream):
    """Streams a prefilling sequence's blocks into a peer's mapped cache as its chunks are
    computed (block_stream.py says when).

    The copies run where the step ran, in order with it: on the engine thread on the CPU, on
    the engine's stream on a GPU. So a block is read only once its KV is written, and never
    after the scheduler hands it to another sequence (a preempted sequence frees its blocks;
    the copies already made hold that KV, and recomputing continues after them).
    """

    def __init__(self, peer_cache: torch.Tensor, dst_ids: list[int], skip_blocks: int):
        super().__init__(dst_ids, skip_blocks, peer_cache.shape[2])
        self.peer_cache = peer_cache
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._done: torch.cuda.Event | None = None

    def _send(self, cache: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
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

    def wait(self) -> None:
        if self._done is not None:
            self._done.synchronize()
            self.seconds = sum(s.elapsed_time(e) for s, e in self._events) / 1000


def _copy_runs(src_cache: torch.Tensor, src_ids: list[int], dst_cache: torch.Tensor,
               dst_ids: list[int]) -> int:
    for src, dst, length in block_runs(src_ids, dst_ids):
        dst_cache[:, :, dst:dst + length].copy_(src_cache[:, :, src:src + length],
                                                non_blocking=True)
    return len(src_ids) * src_cache[:, :, 0].numel() * src_cache.element_size()
