"""Writes a step's new K/V rows into the paged cache by slot mapping.

kv_cache [2, num_blocks, block_size, kv_heads, head_dim]; slot = block_id * block_size +
offset, as build_attention_metadata computes it. A negative slot marks a padding token (a
CUDA-graph batch padded to a fixed size) and is skipped. An fp8 cache stores the values
saturated to its range, unscaled. k and v may be strided views of the
fused qkv projection: only their last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagewire.model.attention import FP8_MAX
from pagewire.model.attention import write_kv_cache as write_kv_cache_torch


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr,
    D_PAD: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs
    dst += offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                mask=mask)
    if FP8:  # saturate: fp8 e4m3 has no infinity, and a cast out of range is not finite
        k = tl.minimum(tl.maximum(k.to(tl.float32), -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -FP8_MAX), FP8_MAX)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [T, kv_heads, head_dim] into kv_cache at slot_mapping [T] (int32 or int64)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert kv_cache.shape[3:] == (num_kv_heads, head_dim)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _kv_cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_kv_heads), D_PAD=triton.next_power_of_2(head_dim),
        PAGE=kv_cache.shape[2], FP8=kv_cache.dtype == torch.float8_e4m3fn, FP8_MAX=FP8_MAX,
        num_warps=4,
    )


def write_kv_cache_reference(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """The torch path's write (shared/model/attention.py), skipping negative slots."""
    keep = slot_mapping >= 0
    write_kv_cache_torch(kv_cache, k[keep], v[keep], slot_mapping[keep].long())
