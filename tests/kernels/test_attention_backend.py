"""The Triton backend against the engine's torch backend on one mixed step: decode tokens
first, then prefill chunks with and without a cached prefix, through the engine's own
metadata builder."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, rel_error, require_triton

require_triton()

import pagewire.model.attention as engine_attention  # noqa: E402
from pagewire.kernels.attention_backend import TritonPagedAttention  # noqa: E402
from pagewire.model.attention import TorchPagedAttention, build_attention_metadata  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_path_only(monkeypatch):
    # The reference is the plain SDPA path, not the native CPU kernel (no C++ build here).
    monkeypatch.setattr(engine_attention, "_native_ok", lambda q, kv_cache: False)


@pytest.mark.parametrize("heads, kv_heads, query_lens, context_lens", [
    (8, 2, [1, 1, 1, 6, 20], [9, 33, 16, 6, 37]),  # decodes, a fresh prompt, a cached prefix
    (4, 4, [1, 1], [5, 50]),                       # decode only
    (6, 2, [13, 3], [13, 40]),                     # prefill only
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_matches_the_torch_backend(heads, kv_heads, query_lens, context_lens, cache_dtype):
    head_dim, block_size, num_blocks = 32, 16, 40
    gen = torch.Generator().manual_seed(sum(context_lens))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in context_lens:  # shuffled, distinct blocks per sequence
        count = -(-n // block_size)
        tables.append(perm[:count])
        perm = perm[count:]
    meta = build_attention_metadata(query_lens, context_lens, tables, block_size, DEVICE)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    if cache_dtype != torch.float32:
        # New K/V already on the fp8 grid: this checks the plumbing, not the rounding (the
        # write kernel's test does that).
        cache = cache.to(cache_dtype)
        k, v = (t.to(cache_dtype).float() for t in (k, v))
    ours_cache, ref_cache = cache.to(DEVICE), cache.clone().to(DEVICE)
    args = (heads, kv_heads, head_dim, head_dim**-0.5)
    out = TritonPagedAttention(*args).forward(q, k, v, ours_cache, meta)
    ref = TorchPagedAttention(*args).forward(q, k, v, ref_cache, meta)
    assert torch.equal(ours_cache.float(), ref_cache.float())
    assert out.shape == ref.shape == (num_tokens, heads * head_dim)
    assert rel_error(out, ref) < 1e-5
