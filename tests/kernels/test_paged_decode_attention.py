"""Paged decode attention (split over the context) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, random_block_tables, rel_error, require_triton

require_triton()

from pagewire.kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pagewire.model.cpu_kernels import (  # noqa: E402
    paged_decode_attention_reference as engine_reference,
)


def _case(seed, seq_lens, heads, kv_heads, head_dim, block_size, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 4 * sum(-(-n // block_size) + 1 for n in seq_lens)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    tables = random_block_tables(gen, seq_lens, block_size, num_blocks)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_decode_attention_reference(q.double(), kv_cache.double(), tables, lens,
                                           head_dim**-0.5)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    return on(q.to(dtype)), on(kv_cache.to(dtype)), on(tables), on(lens), ref


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, seq_lens", [
    (4, 4, 32, 16, [1, 17, 40]),         # no GQA; one-token context; not block multiples
    (8, 2, 64, 16, [33, 5, 70]),         # GQA 4
    (6, 2, 32, 4, [13, 29]),             # GQA 3 (group padded); small blocks
    (4, 1, 16, 8, [64, 9, 31, 2]),       # MQA; block-multiple context
    (4, 2, 48, 16, [21, 50]),            # head_dim not a power of two (padded)
])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference(heads, kv_heads, head_dim, block_size, seq_lens, num_splits):
    q, kv_cache, tables, lens, ref = _case(len(seq_lens) + heads, seq_lens, heads, kv_heads,
                                           head_dim, block_size)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(q, kv_cache, tables, lens, head_dim**-0.5, out=out,
                           num_splits=num_splits, block_n=16)
    assert rel_error(out, ref) < 1e-5


def test_splits_smaller_than_a_tile_and_longer_than_a_context():
    """A split count past the context's tiles collapses; short contexts leave empty splits."""
    q, kv_cache, tables, lens, ref = _case(7, [3, 90], 4, 2, 32, 16)
    out = paged_decode_attention(q, kv_cache, tables, lens, 32**-0.5, num_splits=16,
                                 block_n=16, max_seq_len=200)
    assert rel_error(out, ref) < 1e-5


def test_float16():
    q, kv_cache, tables, lens, ref = _case(11, [20, 47], 8, 2, 32, 16, dtype=torch.float16)
    out = paged_decode_attention(q, kv_cache, tables, lens, 32**-0.5, num_splits=2, block_n=16)
    assert out.dtype == torch.float16
    assert rel_error(out, ref) < 5e-3


@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_cache_is_read_unscaled(num_splits):
    """An fp8 cache widens to q's type: the result is the reference's on the same (rounded)
    values."""
    q, kv_cache, tables, lens, _ = _case(13, [20, 47], 8, 2, 32, 16)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    ref = paged_decode_attention_reference(q.double(), fp8.double(), tables, lens, 32**-0.5)
    out = paged_decode_attention(q, fp8, tables, lens, 32**-0.5, num_splits=num_splits,
                                 block_n=16)
    assert rel_error(out, ref) < 1e-5
    assert rel_error(paged_decode_attention_reference(q, fp8, tables, lens, 32**-0.5), ref) < 1e-5


def test_reference_is_the_engines():
    q, kv_cache, tables, lens, _ = _case(5, [9, 33], 8, 2, 16, 4)
    ours = paged_decode_attention_reference(q, kv_cache, tables, lens, 0.3)
    theirs = engine_reference(q, kv_cache, tables, lens, 0.3)
    assert rel_error(ours, theirs) < 1e-6


def test_fp8_cache_under_bfloat16_queries_dots_in_float16():
    """bf16 q over an fp8 cache takes the float16-dot path (the GPU's); it must agree with the
    reference as closely as the bf16 path does."""
    q, kv_cache, tables, lens, _ = _case(19, [20, 47], 8, 2, 32, 16, dtype=torch.bfloat16)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    ref = paged_decode_attention_reference(q.double(), fp8.double(), tables, lens, 32**-0.5)
    out = paged_decode_attention(q, fp8, tables, lens, 32**-0.5, num_splits=2)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 1e-2
