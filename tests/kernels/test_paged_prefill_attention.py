"""Prefill/extend attention over the paged cache (cached prefix + causal chunk) against its
torch reference."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, random_block_tables, rel_error, require_triton

require_triton()

from pagewire.kernels.paged_prefill_attention import (  # noqa: E402
    paged_prefill_attention,
    paged_prefill_attention_reference,
)


def _case(seed, query_lens, prefix_lens, heads, kv_heads, head_dim, block_size,
          rows_before=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens)]
    num_blocks = 2 * sum(-(-n // block_size) + 1 for n in seq_lens)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    tables = random_block_tables(gen, seq_lens, block_size, num_blocks)
    starts = [rows_before]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    ref = paged_prefill_attention_reference(q.double(), kv_cache.double(), tables, lens,
                                            query_start_loc, head_dim**-0.5)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    return (on(q.to(dtype)), on(kv_cache.to(dtype)), on(tables), on(lens),
            on(query_start_loc), ref)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, query_lens, prefix_lens", [
    (4, 4, 32, 16, [5, 23], [0, 0]),                # fresh prompts, no GQA
    (8, 2, 32, 16, [1, 19, 40], [30, 0, 13]),       # GQA 4, cached prefixes, a decode token
    (6, 3, 16, 4, [17, 3], [9, 50]),                # GQA 2, small blocks, long prefix
    (4, 1, 64, 8, [33], [16]),                      # MQA; block-multiple prefix
    (4, 2, 48, 16, [10, 18], [7, 0]),               # head_dim not a power of two (padded)
])
def test_matches_reference(heads, kv_heads, head_dim, block_size, query_lens, prefix_lens):
    q, kv_cache, tables, lens, starts, ref = _case(
        heads + len(query_lens), query_lens, prefix_lens, heads, kv_heads, head_dim, block_size)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kv_cache, tables, lens, starts, max(query_lens), head_dim**-0.5,
                            out=out, block_m=16, block_n=16)
    assert rel_error(out, ref) < 1e-5


def test_rows_before_the_first_chunk_are_left_alone():
    """The engine hands prefill the rows after its decode tokens: query_start_loc[0] > 0."""
    q, kv_cache, tables, lens, starts, ref = _case(3, [7, 12], [4, 0], 4, 2, 32, 16,
                                                   rows_before=3)
    out = torch.full_like(q, 7.0)
    paged_prefill_attention(q, kv_cache, tables, lens, starts, 12, 32**-0.5, out=out,
                            block_m=16, block_n=16)
    assert (out[:3] == 7.0).all()
    assert rel_error(out[3:], ref[3:]) < 1e-5


def test_tiles_smaller_than_the_chunk():
    """Several query tiles per sequence: the causal bound differs per tile."""
    q, kv_cache, tables, lens, starts, ref = _case(9, [45], [21], 2, 1, 16, 16)
    out = paged_prefill_attention(q, kv_cache, tables, lens, starts, 45, 16**-0.5,
                                  block_m=16, block_n=32)
    assert rel_error(out, ref) < 1e-5


def test_float16():
    q, kv_cache, tables, lens, starts, ref = _case(13, [20, 9], [11, 0], 8, 2, 32, 16,
                                                   dtype=torch.float16)
    out = paged_prefill_attention(q, kv_cache, tables, lens, starts, 20, 32**-0.5,
                                  block_m=16, block_n=16)
    assert out.dtype == torch.float16
    assert rel_error(out, ref) < 5e-3


def test_fp8_cache_is_read_unscaled():
    """An fp8 cache widens to q's type: the result is the reference's on the same values."""
    q, kv_cache, tables, lens, starts, _ = _case(17, [20, 9], [11, 0], 8, 2, 32, 16)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    ref = paged_prefill_attention_reference(q.double(), fp8.double(), tables, lens, starts,
                                            32**-0.5)
    out = paged_prefill_attention(q, fp8, tables, lens, starts, 20, 32**-0.5,
                                  block_m=16, block_n=16)
    assert rel_error(out, ref) < 1e-5


def test_fp8_cache_under_bfloat16_queries_dots_in_float16():
    q, kv_cache, tables, lens, starts, _ = _case(23, [20, 9], [11, 0], 8, 2, 32, 16,
                                                 dtype=torch.bfloat16)
    fp8 = kv_cache.to(torch.float8_e4m3fn)
    ref = paged_prefill_attention_reference(q.double(), fp8.double(), tables, lens, starts,
                                            32**-0.5)
    out = paged_prefill_attention(q, fp8, tables, lens, starts, 20, 32**-0.5,
                                  block_m=16, block_n=16)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 1e-2
