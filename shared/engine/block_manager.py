"""Paged KV-cache block accounting with prefix caching: which block holds which tokens.

Pure bookkeeping in plain Python (no torch, no tensors): the scheduler asks for blocks, the model
runner writes KV into them. A block is either referenced by sequences (ref_count > 0) or sits in
the free queue (ref_count == 0), where it may still carry a prefix hash and be revived by a prefix
hit until it is taken for new tokens. Hashes come from `prefix_hash` and are never computed here.
This module must never guess at a block's content: only `cache_full_blocks` registers a hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while the block is registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Head = next to be reused (least recently freed). An OrderedDict rather than a deque so a
        # prefix hit can pull a cached block out of the middle in O(1).
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._block_id_by_hash: dict[int, int] = {}
        # Net change since the last take_events(): a hash is in at most one of the two, so the
        # consumer can apply them in either order (dicts keep insertion order, sets would not).
        self._stored_hashes: dict[int, None] = {}
        self._removed_hashes: dict[int, None] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count == 0: truly free plus cached-but-unused (evictable)."""
        return len(self._free_queue)

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest leading run of `block_hashes` in the prefix cache.

        No side effects (takes no references). [] when prefix caching is off.
        """
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._block_id_by_hash.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def allocate(
        self, block_table: list[int], num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        """Grow `block_table` in place to cover `num_tokens` slots; False (and no change) if short.

        `cached_blocks` (from cached_prefix_blocks, only with an empty table) go first and each
        gains a reference; then fresh blocks come from the head of the free queue, evicting any
        hash they still carry.
        """
        assert num_tokens >= 0
        assert not cached_blocks or not block_table, "cached_blocks only for an empty block_table"
        assert len(set(cached_blocks)) == len(cached_blocks), "cached block listed twice"
        num_blocks_needed = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_blocks_needed - len(block_table) - len(cached_blocks))
        assert len(cached_blocks) <= num_blocks_needed, "cached blocks beyond num_tokens"
        # A revived cached block leaves the free queue, so it cannot also serve as a fresh block.
        num_revived = 0
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            assert block.block_hash is not None, f"block {block_id} is not in the prefix cache"
            num_revived += block.ref_count == 0
        if num_new_blocks > self.num_free_blocks - num_revived:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_queue[block_id]
            block.ref_count += 1
            block_table.append(block_id)
        for _ in range(num_new_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0
            if block.block_hash is not None:
                self._uncache(block)
            block.ref_count = 1
            block_table.append(block_id)
        return True

    def cache_full_blocks(
        self, block_table: Sequence[int], block_hashes: Sequence[int], num_computed_tokens: int,
        first_block: int = 0,
    ) -> None:
        """Register block_hashes[i] -> block_table[i] for every full block whose KV is computed,
        from first_block on (the scheduler passes the first block that filled this step, so a
        step costs O(new blocks), not O(prefix)).

        Idempotent. When a hash already maps to another block (two sequences computed the same
        content), the existing mapping stays and this block is left unregistered.
        """
        if not self.enable_prefix_caching:
            return
        num_full_blocks = min(len(block_hashes), num_computed_tokens // self.block_size)
        assert num_full_blocks <= len(block_table), "computed tokens beyond the block table"
        computed = zip(block_table[first_block:num_full_blocks],
                       block_hashes[first_block:num_full_blocks], strict=True)
        for block_id, block_hash in computed:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"caching block {block_id} that nobody holds"
            if block.block_hash is not None:
                # Same position, same tokens: a block's hash can only ever be this one.
                assert block.block_hash == block_hash, f"block {block_id} changed content"
                continue
            if block_hash in self._block_id_by_hash:
                continue
            block.block_hash = block_hash
            self._block_id_by_hash[block_hash] = block_id
            self._record(block_hash, stored=True)

    def free(self, block_table: list[int]) -> None:
        """Drop one reference per block, tail first, and clear `block_table` in place.

        Blocks reaching ref 0 with a hash go to the tail of the free queue (reused last, so a
        sequence's tail is evicted before its head); blocks without a hash go to the head, since
        reusing them first costs no cached prefix.
        """
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block_id] = None
                if block.block_hash is None:
                    self._free_queue.move_to_end(block_id, last=False)
        block_table.clear()

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Frees the blocks beyond the first ceil(num_tokens / block_size), tail first: slots
        allotted to speculative drafts that were rejected. Such blocks hold no registered hash
        (only known tokens are hashed), so they go to the head of the free queue."""
        keep = -(-num_tokens // self.block_size)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.free(tail)

    def cached_hashes(self) -> list[int]:
        """Every hash the prefix cache holds now (to republish a lost index)."""
        return list(self._block_id_by_hash)

    def take_events(self) -> tuple[list[int], list[int]]:
        """(stored_hashes, removed_hashes) net since the last call, disjoint; clears them."""
        events = (list(self._stored_hashes), list(self._removed_hashes))
        self._stored_hashes.clear()
        self._removed_hashes.clear()
        return events

    def reset_prefix_cache(self) -> None:
        """Forget the hash of every unreferenced block; blocks in use keep theirs."""
        for block_id in list(self._block_id_by_hash.values()):
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._uncache(block)
                self._free_queue.move_to_end(block_id, last=False)  # now plain free: reuse first

    def check_invariants(self) -> None:
        free_ids = set(self._free_queue)
        assert len(free_ids) == len(self._free_queue) <= self.num_blocks
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has ref {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in free_ids), block
            if block.block_hash is not None:
                assert self._block_id_by_hash.get(block.block_hash) == block.block_id, block
        for block_hash, block_id in self._block_id_by_hash.items():
            assert self.blocks[block_id].block_hash == block_hash
        assert self.enable_prefix_caching or not self._block_id_by_hash
        assert not self._stored_hashes.keys() & self._removed_hashes.keys()

    def _uncache(self, block: Block) -> None:
        assert block.block_hash is not None
        assert self._block_id_by_hash[block.block_hash] == block.block_id
        del self._block_id_by_hash[block.block_hash]
        self._record(block.block_hash, stored=False)
        block.block_hash = None

    def _record(self, block_hash: int, stored: bool) -> None:
        # A hash alternates present/absent, so a store undoes a pending removal and vice versa.
        undo, do = (
            (self._removed_hashes, self._stored_hashes)
            if stored
            else (self._stored_hashes, self._removed_hashes)
        )
        if block_hash in undo:
            del undo[block_hash]
        else:
            do[block_hash] = None
