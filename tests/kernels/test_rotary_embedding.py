"""Rotary embedding (rotate-half, precomputed tables) against the engine's RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, rel_error, require_triton

require_triton()

from pagewire.kernels.rotary_embedding import (  # noqa: E402
    rotary_embedding,
    rotary_embedding_reference,
)
from pagewire.model.layers import RotaryEmbedding  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _qk(seed, num_tokens, heads, kv_heads, head_dim, dtype):
    """q and k as strided views of one fused qkv output, as the engine has them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, _ = qkv.to(DEVICE).split([heads * head_dim, kv_heads * head_dim,
                                    kv_heads * head_dim], -1)
    return q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim)


@pytest.mark.parametrize("heads, kv_heads, head_dim, scaling, theta", [
    (4, 2, 32, None, 10000.0),
    (6, 6, 64, LLAMA3, 500000.0),
    (3, 1, 48, None, 100000.0),  # half of head_dim not a power of two
])
def test_matches_the_engines_module(heads, kv_heads, head_dim, scaling, theta):
    rope = RotaryEmbedding(head_dim, 512, theta, scaling).to(DEVICE)
    q, k = _qk(head_dim, 11, heads, kv_heads, head_dim, torch.float32)
    positions = torch.tensor([0, 1, 2, 7, 100, 511, 3, 64, 65, 200, 5], device=DEVICE)
    q_out, k_out = rotary_embedding(positions, q, k, rope.cos, rope.sin)
    q_ref, k_ref = rope(positions, q, k)
    assert rel_error(q_out, q_ref) < 1e-6 and rel_error(k_out, k_ref) < 1e-6


def test_float16():
    rope = RotaryEmbedding(32, 128, 10000.0, None).to(DEVICE)
    q, k = _qk(5, 6, 4, 2, 32, torch.float16)
    positions = torch.tensor([3, 9, 27, 81, 100, 127], device=DEVICE)
    q_out, k_out = rotary_embedding(positions, q, k, rope.cos, rope.sin)
    q_ref, k_ref = rotary_embedding_reference(positions, q.float(), k.float(), rope.cos,
                                              rope.sin)
    assert q_out.dtype == torch.float16
    assert rel_error(q_out, q_ref) < 2e-3 and rel_error(k_out, k_ref) < 2e-3
