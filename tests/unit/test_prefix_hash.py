"""Conformance of the published prefix hash: the router recomputes these values elsewhere, so
any change to the algorithm must fail here (and be a deliberate protocol change)."""

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from pagewire.engine.prefix_hash import (
    ROOT_HASH,
    extend_block_hashes,
    hash_block,
    hash_full_blocks,
)

# Computed once with the version-1 algorithm and frozen.
PINNED = [
    ((list(range(32)), 16), [2647778289425333254, 11562412869759332027]),
    (([0] * 4, 2), [15034821391391295848, 7145399472374710943]),
    (([2**32 - 1] * 3, 1), [12718989583347894263, 9085200688849370961, 18045629653074721666]),
    (([151643, 9707, 11, 1879, 0], 2), [2921206518295442095, 7165959369494102472]),
]


@pytest.mark.parametrize(("args", "expected"), PINNED)
def test_pinned_values(args, expected):
    assert hash_full_blocks(*args) == expected


def test_pinned_single_blocks():
    assert ROOT_HASH == 0
    assert hash_block(2**64 - 1, [7, 8, 9]) == 2244976558540073418
    assert hash_block(ROOT_HASH, []) == 14374147212387527897


def test_matches_documented_byte_layout():
    tokens = [5, 70000, 2**31]
    expected = xxhash.xxh3_64_intdigest(
        (123).to_bytes(8, "little") + struct.pack("<3I", *tokens), seed=0
    )
    assert hash_block(123, tokens) == expected


def test_first_block_chains_on_root_hash():
    assert hash_full_blocks([1, 2, 3, 4], 4) == [hash_block(ROOT_HASH, [1, 2, 3, 4])]


def test_same_block_under_different_parents_differs():
    block = [9, 9, 9, 9]
    assert hash_block(1, block) != hash_block(2, block)
    a = hash_full_blocks([1, 2, 3, 4] + block, 4)
    b = hash_full_blocks([4, 3, 2, 1] + block, 4)
    assert a[1] != b[1]


def test_prefix_hashes_are_shared():
    a = hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_full_blocks([1, 2, 3, 4, 8, 7, 6, 5], 4)
    assert a[0] == b[0] and a[1] != b[1]


def test_partial_block_not_hashed():
    assert hash_full_blocks(list(range(15)), 16) == []
    assert hash_full_blocks(list(range(31)), 16) == hash_full_blocks(list(range(16)), 16)
    assert hash_full_blocks([], 16) == []


def test_explicit_parent_hash_continues_a_chain():
    tokens = list(range(12))
    full = hash_full_blocks(tokens, 4)
    assert hash_full_blocks(tokens[4:], 4, parent_hash=full[0]) == full[1:]


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=64),
    block_size=st.integers(1, 8),
    steps=st.lists(st.integers(0, 10), max_size=10),
)
def test_extend_incrementally_equals_full(tokens, block_size, steps):
    block_hashes: list[int] = []
    length = 0
    for step in steps:
        length = min(len(tokens), length + step)
        extend_block_hashes(block_hashes, tokens[:length], block_size)
        assert block_hashes == hash_full_blocks(tokens[:length], block_size)
    extend_block_hashes(block_hashes, tokens, block_size)
    assert block_hashes == hash_full_blocks(tokens, block_size)


@pytest.mark.parametrize("bad_token", [-1, 2**32, 1.5, "7", None])
def test_bad_token_ids_raise(bad_token):
    with pytest.raises(ValueError):
        hash_full_blocks([1, 2, bad_token, 4], 2)
    with pytest.raises(ValueError):
        hash_block(ROOT_HASH, [bad_token])


@pytest.mark.parametrize("block_size", [0, -1])
def test_bad_block_size_raises(block_size):
    with pytest.raises(ValueError):
        hash_full_blocks([1, 2, 3], block_size)
    with pytest.raises(ValueError):
        extend_block_hashes([], [1, 2, 3], block_size)


def test_bad_parent_hash_raises():
    with pytest.raises(ValueError):
        hash_block(-1, [1])
    with pytest.raises(ValueError):
        hash_block(2**64, [1])


def test_extend_rejects_hashes_beyond_tokens():
    with pytest.raises(ValueError):
        extend_block_hashes([1, 2], [0] * 7, 4)
