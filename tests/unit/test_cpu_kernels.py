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


@pytest.mark.parametrize("m, k, n, bits, group", [
    (1, 576, 1536, 4, 32), (5, 128, 70, 4, 128), (16, 96, 64, 8, 16), (3, 256, 130, 8, 32)])
def test_weight_only_gemm_matches_dequantize_then_multiply(m, k, n, bits, group):
    """x @ (q * scale + offset) with packed integers: 4 and 8 bits, groups of 16 to 128,
    column counts that leave a partial tile, f16 scales as GGUF keeps them."""
    from pagewire.model.cpu_kernels import weight_only_gemm_op
    from pagewire.model.quantization.weight_only import pack_rows

    op = weight_only_gemm_op()
    assert op is not None, "the CPU kernel did not build (a C++ compiler and ninja are required)"
    gen = torch.Generator().manual_seed(m * k + n)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01).half()
    offsets = (torch.randn(k // group, n, generator=gen) * 0.01).half()
    x = torch.randn(m, k, generator=gen)
    w = q.float().view(-1, group, n) * scales.float().unsqueeze(1) + \
        offsets.float().unsqueeze(1)
    want = x.double() @ w.view(k, n).double()
    got = op.weight_only_gemm(x, pack_rows(q, bits), scales, offsets, bits, group)
    assert got.shape == (m, n)
    assert float((got.double() - want).norm() / want.norm()) < 1e-5
