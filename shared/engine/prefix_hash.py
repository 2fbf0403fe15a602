"""The one published hash for prefix caching: a chained hash over full blocks of token ids.

The router computes the same values in another process on another machine to score prefix
overlap, so this module must never use Python's `hash()` (salted per process) or anything else
whose output depends on the interpreter, platform or run. Changing the algorithm is a protocol
change: tests/unit/test_prefix_hash.py pins exact values.

Algorithm (version 1):
    ROOT_HASH = 0
    for each FULL block i of `block_size` token ids (a trailing partial block is not hashed):
        parent_bytes = parent_hash as 8 bytes, unsigned little-endian
                       (parent_hash is ROOT_HASH for block 0, else the hash of block i-1)
        tokens_bytes = the block's token ids, each as unsigned 32-bit little-endian
        h_i = xxhash.xxh3_64_intdigest(parent_bytes + tokens_bytes, seed=0)
Each h_i is an unsigned 64-bit int and identifies the whole prefix ending with block i.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence

import xxhash

ROOT_HASH: int = 0

_MAX_TOKEN_ID = 2**32
_MAX_HASH = 2**64


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one block of `token_ids` chained onto `parent_hash`."""
    return _hash_packed(parent_hash, _pack_token_ids(token_ids))


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH
) -> list[int]:
    """Chained hashes of every full block of `token_ids`; a trailing partial block is skipped."""
    block_hashes: list[int] = []
    _append_hashes(block_hashes, token_ids, block_size, parent_hash)
    return block_hashes


def extend_block_hashes(block_hashes: list[int], token_ids: Sequence[int], block_size: int) -> None:
    """Append to `block_hashes` the hashes of full blocks of `token_ids` it does not cover yet.

    `block_hashes` holds the hashes of the first len(block_hashes) blocks of `token_ids`, as a
    sequence grows by decode steps.
    """
    _check_block_size(block_size)
    if len(block_hashes) * block_size > len(token_ids):
        raise ValueError(
            f"{len(block_hashes)} block hashes cover more than {len(token_ids)} tokens"
        )
    parent_hash = block_hashes[-1] if block_hashes else ROOT_HASH
    start = len(block_hashes) * block_size
    _append_hashes(block_hashes, token_ids[start:], block_size, parent_hash)


def _append_hashes(
    out: list[int], token_ids: Sequence[int], block_size: int, parent_hash: int
) -> None:
    _check_block_size(block_size)
    num_full_blocks = len(token_ids) // block_size
    # Pack once and slice: one C-level pass instead of one struct call per block.
    tokens_bytes = _pack_token_ids(token_ids[: num_full_blocks * block_size])
    block_nbytes = 4 * block_size
    for i in range(num_full_blocks):
        block_bytes = tokens_bytes[i * block_nbytes : (i + 1) * block_nbytes]
        parent_hash = _hash_packed(parent_hash, block_bytes)
        out.append(parent_hash)


def _pack_token_ids(token_ids: Sequence[int]) -> bytes:
    # An explicit '<' fixes byte order and width on every platform (array('I') would not).
    try:
        return struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error:
        bad = next((t for t in token_ids if not _is_token_id(t)), None)
        raise ValueError(f"token ids must be ints in [0, 2**32), got {bad!r}") from None


def _is_token_id(token_id: object) -> bool:
    try:
        return 0 <= operator.index(token_id) < _MAX_TOKEN_ID  # type: ignore[arg-type]
    except TypeError:
        return False


def _hash_packed(parent_hash: int, tokens_bytes: bytes) -> int:
    if not 0 <= parent_hash < _MAX_HASH:
        raise ValueError(f"parent_hash must be an unsigned 64-bit int, got {parent_hash}")
    return xxhash.xxh3_64_intdigest(struct.pack("<Q", parent_hash) + tokens_bytes, seed=0)


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
