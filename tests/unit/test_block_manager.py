"""Block manager: allocation, prefix hits, LRU eviction, events, and a stateful property test."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagewire.engine.block_manager import BlockManager
from pagewire.engine.prefix_hash import extend_block_hashes, hash_full_blocks


def run_sequence(bm: BlockManager, token_ids: list[int]) -> list[int]:
    """Allocate with prefix hits and compute all of `token_ids`; returns the block table."""
    block_hashes = hash_full_blocks(token_ids, bm.block_size)
    block_table: list[int] = []
    assert bm.allocate(block_table, len(token_ids), bm.cached_prefix_blocks(block_hashes))
    bm.cache_full_blocks(block_table, block_hashes, len(token_ids))
    return block_table


def block_states(bm: BlockManager) -> list[tuple[int, int | None]]:
    return [(block.ref_count, block.block_hash) for block in bm.blocks]


def test_allocate_grows_block_table_in_place():
    bm = BlockManager(num_blocks=10, block_size=4)
    block_table: list[int] = []
    assert bm.allocate(block_table, 0) and block_table == []
    assert bm.allocate(block_table, 5)
    assert len(block_table) == 2
    first_two = list(block_table)
    assert bm.allocate(block_table, 8) and block_table == first_two
    assert bm.allocate(block_table, 9) and block_table[:2] == first_two and len(block_table) == 3
    assert all(bm.blocks[b].ref_count == 1 for b in block_table)
    assert bm.num_free_blocks == 7
    bm.check_invariants()


def test_prefix_hit_shares_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    table_a = run_sequence(bm, list(range(12)))
    hashes_b = hash_full_blocks(list(range(8)) + [99, 99, 99, 99], 4)
    cached = bm.cached_prefix_blocks(hashes_b)
    assert cached == table_a[:2]
    assert [bm.blocks[b].ref_count for b in table_a] == [1, 1, 1]  # lookup takes no reference
    table_b: list[int] = []
    assert bm.allocate(table_b, 12, cached)
    assert table_b[:2] == table_a[:2] and table_b[2] not in table_a
    assert [bm.blocks[b].ref_count for b in table_b] == [2, 2, 1]
    assert bm.num_free_blocks == 10 - 4
    bm.check_invariants()


def test_freed_cached_blocks_are_revived_by_a_prefix_hit():
    bm = BlockManager(num_blocks=4, block_size=2)
    table_a = run_sequence(bm, [1, 2, 3, 4])
    cached_ids = list(table_a)
    bm.free(table_a)
    assert table_a == [] and bm.num_free_blocks == 4
    table_b = run_sequence(bm, [1, 2, 3, 4, 5])
    assert table_b[:2] == cached_ids
    assert bm.num_free_blocks == 1
    bm.check_invariants()


def test_fresh_blocks_come_from_lru_head_and_tail_blocks_are_evicted_first():
    bm = BlockManager(num_blocks=6, block_size=1)
    table_a = run_sequence(bm, [1, 2, 3])
    table_b = run_sequence(bm, [7, 8, 9])
    a_ids, b_ids = list(table_a), list(table_b)
    bm.free(table_a)
    bm.free(table_b)
    block_table: list[int] = []
    bm.allocate(block_table, 6)
    # A was freed first and each sequence's tail before its head.
    assert block_table == a_ids[::-1] + b_ids[::-1]


def test_blocks_without_hash_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    table_a = run_sequence(bm, [1, 2, 3])  # block 0 cached, block 1 partial
    cached_id, partial_id = table_a
    bm.free(table_a)
    block_table: list[int] = []
    bm.allocate(block_table, 2)
    assert block_table == [partial_id]
    assert bm.cached_prefix_blocks(hash_full_blocks([1, 2], 2)) == [cached_id]


def test_eviction_records_events():
    bm = BlockManager(num_blocks=2, block_size=2)
    hashes = hash_full_blocks([1, 2, 3, 4], 2)
    table = run_sequence(bm, [1, 2, 3, 4])
    assert bm.take_events() == (hashes, [])
    assert bm.take_events() == ([], [])
    bm.free(table)
    other: list[int] = []
    assert bm.allocate(other, 2)  # evicts the tail block of the freed sequence
    assert bm.take_events() == ([], [hashes[1]])
    cached = bm.cached_prefix_blocks(hashes)
    assert len(cached) == 1 and cached[0] not in other


def test_events_are_net_since_last_take():
    bm = BlockManager(num_blocks=1, block_size=1)
    table = run_sequence(bm, [5])
    bm.free(table)
    other: list[int] = []
    bm.allocate(other, 1)  # stored then evicted before anyone looked: no news
    assert bm.take_events() == ([], [])
    bm.free(other)
    table = run_sequence(bm, [5])
    assert bm.take_events() == (hash_full_blocks([5], 1), [])


def test_allocate_fails_atomically():
    bm = BlockManager(num_blocks=4, block_size=4)
    block_table: list[int] = []
    assert not bm.allocate(block_table, 17)
    assert block_table == [] and bm.num_free_blocks == 4
    assert bm.allocate(block_table, 4)
    before = block_states(bm)
    assert not bm.allocate(block_table, 17)
    assert len(block_table) == 1 and block_states(bm) == before
    bm.check_invariants()


def test_allocate_counts_revived_cached_blocks_as_unavailable():
    bm = BlockManager(num_blocks=4, block_size=1)
    table_a = run_sequence(bm, [1, 2])
    bm.free(table_a)
    hashes = hash_full_blocks([1, 2, 3, 4, 5], 1)
    cached = bm.cached_prefix_blocks(hashes)
    assert len(cached) == 2 and bm.num_free_blocks == 4
    before = block_states(bm)
    block_table: list[int] = []
    # 2 revived + 3 fresh > 4 blocks, even though 4 are "free".
    assert not bm.allocate(block_table, 5, cached)
    assert block_table == [] and block_states(bm) == before and bm.num_free_blocks == 4
    assert bm.allocate(block_table, 4, cached) and block_table[:2] == cached
    bm.check_invariants()


def test_cache_full_blocks_is_idempotent_and_only_caches_computed_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    token_ids = list(range(10))
    hashes = hash_full_blocks(token_ids, 4)
    table: list[int] = []
    bm.allocate(table, 10)
    bm.cache_full_blocks(table, hashes, 7)  # only block 0 is full and computed
    assert bm.cached_prefix_blocks(hashes) == table[:1]
    bm.cache_full_blocks(table, hashes, 10)
    bm.cache_full_blocks(table, hashes, 10)
    assert bm.cached_prefix_blocks(hashes) == table[:2]
    assert bm.take_events() == (hashes, [])
    bm.check_invariants()


def test_duplicate_content_keeps_the_first_mapping():
    bm = BlockManager(num_blocks=4, block_size=2)
    hashes = hash_full_blocks([1, 2], 2)
    table_a: list[int] = []
    table_b: list[int] = []
    bm.allocate(table_a, 2)
    bm.allocate(table_b, 2)  # both computed without a hit on each other
    bm.cache_full_blocks(table_a, hashes, 2)
    bm.cache_full_blocks(table_b, hashes, 2)
    assert bm.cached_prefix_blocks(hashes) == table_a
    assert bm.blocks[table_b[0]].block_hash is None
    assert bm.take_events() == (hashes, [])
    bm.check_invariants()


def test_prefix_caching_off_caches_nothing():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    table = run_sequence(bm, [1, 2, 3, 4])
    assert bm.cached_prefix_blocks(hash_full_blocks([1, 2, 3, 4], 2)) == []
    assert bm.take_events() == ([], [])
    bm.free(table)
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_reset_prefix_cache_drops_only_unreferenced_hashes():
    bm = BlockManager(num_blocks=6, block_size=2)
    table_a = run_sequence(bm, [1, 2, 3, 4])
    table_b = run_sequence(bm, [5, 6])
    bm.take_events()
    hashes_a = hash_full_blocks([1, 2, 3, 4], 2)
    bm.free(table_a)
    bm.reset_prefix_cache()
    assert bm.cached_prefix_blocks(hashes_a) == []
    assert bm.cached_prefix_blocks(hash_full_blocks([5, 6], 2)) == table_b
    stored, removed = bm.take_events()
    assert stored == [] and sorted(removed) == sorted(hashes_a)
    bm.check_invariants()


def test_double_free_raises():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = run_sequence(bm, [1, 2, 3])
    copy = list(table)
    bm.free(table)
    with pytest.raises(AssertionError):
        bm.free(copy)


def test_bad_config_raises():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


TOKEN_IDS = st.lists(st.integers(0, 1), min_size=1, max_size=10)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random sequences over a 2-token alphabet, many forked from earlier ones, so prefixes
    collide and blocks get shared, revived from the free queue and evicted."""

    @initialize(
        num_blocks=st.integers(1, 24),
        block_size=st.integers(1, 3),
        enable_prefix_caching=st.booleans(),
        first_prompts=st.lists(TOKEN_IDS, max_size=4),
    )
    def setup(self, num_blocks, block_size, enable_prefix_caching, first_prompts):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.seqs: dict[int, dict] = {}
        self.next_seq_id = 0
        self.past_token_ids: list[list[int]] = []  # every sequence ever added, to fork from
        self.published_hashes: set[int] = set()  # what a prefix index learns from events
        self.block_content: dict[int, tuple[int, ...]] = {}  # model of the KV in each block
        for token_ids in first_prompts:  # start busy: short runs then still reach prefix hits
            self.add(token_ids, prefill=True)

    def snapshot(self):
        return block_states(self.bm), self.bm.num_free_blocks

    def pick(self, index: int) -> int:
        return sorted(self.seqs)[index % len(self.seqs)]

    @rule(token_ids=TOKEN_IDS, prefill=st.booleans())
    def add_sequence(self, token_ids, prefill):
        self.add(token_ids, prefill)

    @precondition(lambda self: self.past_token_ids)
    @rule(
        index=st.integers(0, 100), keep=st.integers(0, 12), suffix=TOKEN_IDS, prefill=st.booleans()
    )
    def fork_sequence(self, index, keep, suffix, prefill):
        """A new sequence sharing a prefix with an earlier one (live or freed)."""
        past = self.past_token_ids[index % len(self.past_token_ids)]
        self.add(past[:keep] + suffix, prefill)

    def add(self, token_ids, prefill):
        """Allocate with prefix hits; with `prefill`, compute the whole prompt at once."""
        self.past_token_ids.append(token_ids)
        bs = self.bm.block_size
        block_hashes = hash_full_blocks(token_ids, bs)
        cached = self.bm.cached_prefix_blocks(block_hashes)
        for i, block_id in enumerate(cached):  # a hit must hold exactly these tokens
            assert self.block_content[block_id] == tuple(token_ids[i * bs : (i + 1) * bs])
        before = self.snapshot()
        block_table: list[int] = []
        if not self.bm.allocate(block_table, len(token_ids), cached):
            assert block_table == [] and self.snapshot() == before
            return
        self.forget_fresh_blocks(block_table[len(cached) :])
        self.seqs[self.next_seq_id] = dict(
            token_ids=list(token_ids),
            block_table=block_table,
            block_hashes=block_hashes,
            num_computed_tokens=len(cached) * bs,
        )
        self.next_seq_id += 1
        if prefill:
            self.compute_tokens(self.seqs[self.next_seq_id - 1], len(token_ids))

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 100), new_tokens=st.lists(st.integers(0, 1), max_size=4))
    def grow(self, index, new_tokens):
        seq = self.seqs[self.pick(index)]
        before = self.snapshot()
        num_old_blocks = len(seq["block_table"])
        num_tokens = len(seq["token_ids"]) + len(new_tokens)
        if not self.bm.allocate(seq["block_table"], num_tokens):
            assert len(seq["block_table"]) == num_old_blocks and self.snapshot() == before
            return
        seq["token_ids"] += new_tokens
        self.forget_fresh_blocks(seq["block_table"][num_old_blocks:])

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 100), num_new=st.integers(1, 12))
    def compute(self, index, num_new):
        self.compute_tokens(self.seqs[self.pick(index)], num_new)

    def compute_tokens(self, seq, num_new):
        """Pretend the model ran on the next `num_new` tokens, then cache what became full."""
        bs = self.bm.block_size
        token_ids = seq["token_ids"]
        seq["num_computed_tokens"] = min(len(token_ids), seq["num_computed_tokens"] + num_new)
        for i in range(seq["num_computed_tokens"] // bs):
            block_id = seq["block_table"][i]
            content = tuple(token_ids[i * bs : (i + 1) * bs])
            if self.bm.blocks[block_id].ref_count > 1:  # never overwrite shared KV
                assert self.block_content[block_id] == content
            self.block_content[block_id] = content
        extend_block_hashes(seq["block_hashes"], token_ids, bs)
        self.bm.cache_full_blocks(
            seq["block_table"], seq["block_hashes"], seq["num_computed_tokens"]
        )

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 100))
    def free(self, index):
        seq = self.seqs.pop(self.pick(index))
        self.bm.free(seq["block_table"])
        assert seq["block_table"] == []

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()

    @rule()
    def take_events(self):
        stored, removed = self.bm.take_events()
        assert not set(stored) & set(removed)
        assert not set(stored) & self.published_hashes, "stored twice"
        assert set(removed) <= self.published_hashes, "removed what was never stored"
        self.published_hashes = (self.published_hashes | set(stored)) - set(removed)
        assert self.published_hashes == self.registered_hashes()

    def forget_fresh_blocks(self, block_ids):
        for block_id in block_ids:
            self.block_content.pop(block_id, None)  # fresh block: its old KV is garbage

    def registered_hashes(self) -> set[int]:
        return {b.block_hash for b in self.bm.blocks if b.block_hash is not None}

    @invariant()
    def accounting_is_consistent(self):
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        bm.check_invariants()
        tables = [seq["block_table"] for seq in self.seqs.values()]
        assert sum(len(t) for t in tables) == sum(b.ref_count for b in bm.blocks)
        referenced = {block_id for t in tables for block_id in t}
        assert bm.num_free_blocks + len(referenced) == bm.num_blocks
        for seq in self.seqs.values():
            table = seq["block_table"]
            assert len(set(table)) == len(table), "block twice in one sequence"
            assert len(table) == -(-len(seq["token_ids"]) // bm.block_size)
            for i, block_id in enumerate(table):
                block_hash = bm.blocks[block_id].block_hash
                if block_hash is not None:  # a cached block sits at the position it hashes
                    assert block_hash == seq["block_hashes"][i]
            # A block shared between sequences must be a full, cached block in both.
            for block_id in table:
                if bm.blocks[block_id].ref_count > 1:
                    assert bm.blocks[block_id].block_hash is not None
        if not bm.enable_prefix_caching:
            assert not self.registered_hashes()

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.seqs.values()):
            self.bm.free(seq["block_table"])
        self.seqs.clear()
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks, "leaked blocks"
        self.bm.reset_prefix_cache()
        assert not self.registered_hashes()
        self.bm.check_invariants()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
test_block_manager_state_machine = BlockManagerMachine.TestCase


def test_trim_gives_back_the_blocks_of_rejected_drafts():
    manager = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    assert manager.allocate(table, 13)  # 9 known tokens + 4 drafts: 4 blocks
    manager.trim(table, 10)  # 1 draft accepted, the bonus token after it: 3 blocks
    assert len(table) == 3 and manager.num_free_blocks == 5
    manager.trim(table, 10)  # nothing beyond: no change
    assert len(table) == 3
    manager.free(table)
    manager.check_invariants()
    assert manager.num_free_blocks == 8
