"""The native CPU paged decode attention against its torch reference on random inputs."""

from __future__ import annotations

import pytest
import torch

from pagewire.model.cpu_kernels import paged_decode_attention_op, paged_decode_attention_reference


@pytest.fixture(scope="module")
def op():
    module = paged_decode_attention_op()
    if module is None:
        pytest.fail("the CPU kernel did not build (a C++ compiler and ninja are required)")
    return module


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (9, 3, 64, 16), (8, 8, 32, 4), (16, 2, 128, 16), (4, 1, 64, 8)])
def test_matches_reference(op, heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads * 100 + block_size)
    num_blocks, batch = 64, 7
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    seq_lens = torch.randint(1, 12 * block_size, (batch,), generator=gen, dtype=torch.int32)
    max_blocks = int(-(-seq_lens.max() // block_size))
    # distinct random blocks per sequence, padded with garbage ids that must never be read
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks]
                          for _ in range(batch)]).to(torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = op.paged_decode_attention(q, kv_cache, tables, seq_lens, scale)
    ref = paged_decode_attention_reference(q.double(), kv_cache.double(), tables, seq_lens,
                                           scale)
    assert torch.isfinite(out).all()
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5


def test_rejects_wrong_dtype(op):
    q = torch.randn(1, 2, 8, dtype=torch.float64)
    kv = torch.randn(2, 4, 4, 2, 8)
    with pytest.raises(RuntimeError, match="float32"):
        op.paged_decode_attention(q, kv, torch.zeros(1, 1, dtype=torch.int32),
                                  torch.ones(1, dtype=torch.int32), 1.0)
