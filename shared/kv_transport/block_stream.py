"""What every streaming KV sink shares: which of a prefilling sequence's blocks a step finished.

The engine calls a sequence's `kv_sink.on_computed` on its own thread right after each step
that advanced the sequence, and `kv_sink.before_free()` before it frees the sequence's blocks
(preempted, aborted, released). A sink sends each block once, in order, as soon as it is
complete: the full blocks of every chunk, and the partial last block once the whole prompt is
computed. So a long prompt's early blocks travel while its later chunks compute, and the last
ones leave in the step that finishes the prompt, not after it.

How the blocks travel is the subclass's `_send`: a copy into a mapped peer cache
(mapped_cache.py: shm, cuda_ipc) or a NIXL write (nixl_stream.py).
"""

from __future__ import annotations

import threading

import torch


class BlockStream:
    def __init__(self, dst_ids: list[int], skip_blocks: int, peer_num_blocks: int):
        if any(not 0 <= i < peer_num_blocks for i in dst_ids):
            raise ValueError(f"destination blocks outside the peer's {peer_num_blocks}")
        self.dst_ids = dst_ids
        self.skip_blocks = skip_blocks
        self.num_sent = 0  # of dst_ids, handed to _send
        self.num_bytes = 0  # landed at the peer (as far as `wait` has seen)
        self.seconds = 0.0  # the bytes' time on the move
        self.error: Exception | None = None
        self._lock = threading.Lock()  # the engine thread sends; another thread stops it
        self._stopped = False

    def on_computed(self, cache: torch.Tensor, block_table: list[int], num_computed: int,
                    num_prompt_tokens: int) -> None:
        """Sends the blocks the step completed. Never raises (it runs inside the engine's
        step): a failure is kept in `error` and ends the streaming."""
        with self._lock:
            if self.error is not None or self._stopped:
                return
            block_size = cache.shape[3]
            if num_computed >= num_prompt_tokens:
                upto = -(-num_prompt_tokens // block_size)
            else:
                upto = num_computed // block_size
            first = self.skip_blocks + self.num_sent
            if upto <= first:
                return
            src_ids = block_table[first:upto]
            dst_ids = self.dst_ids[self.num_sent:upto - self.skip_blocks]
            try:
                self._send(cache, src_ids, dst_ids)
            except Exception as exc:  # noqa: BLE001 - reported to the request, not the engine
                self.error = exc
                return
            self.num_sent += len(src_ids)

    def stop(self) -> None:
        """No send starts after this returns (one under way finishes first): then `wait`
        covers every byte that will ever reach the peer's blocks."""
        with self._lock:
            self._stopped = True

    @property
    def complete(self) -> bool:
        return self.num_sent == len(self.dst_ids) and self.error is None

    def _send(self, cache: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        """Blocks until every send issued has landed (called off the engine thread)."""
        raise NotImplementedError

    def before_free(self) -> None:
        """Called on the engine thread before the sequence's blocks go back to the pool: a
        sink that still reads them finishes first. Copies ordered with the engine's own work
        (on its thread, or on its CUDA stream) need nothing."""
