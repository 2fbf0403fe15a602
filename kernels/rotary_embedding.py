"""Neox-style (rotate-half) rotary embedding of q and k in one launch, one program per token.

Takes the engine's precomputed tables (pagewire.model.layers.RotaryEmbedding's `cos` and
`sin`, [max_position, head_dim] float32, both halves equal), so Llama 3 scaling and any theta
come for free. Computes in float32 and rounds once; the torch path rounds cos/sin and each
product to the input dtype first, so in bf16 the two differ by rounding only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, out_ptr, stride_xt, stride_xh, stride_ot, stride_oh, token, cos, sin,
            NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
            H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    src = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, token,
            cos[None, :], sin[None, :], NUM_Q_HEADS, HALF, QH_PAD, HALF_PAD)
    _rotate(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh, token,
            cos[None, :], sin[None, :], NUM_KV_HEADS, HALF, KH_PAD, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, head_dim], k [T, kv_heads, head_dim], positions [T] -> rotated (q, k) as
    new contiguous tensors. q and k may be strided views (of the fused qkv output)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == (num_tokens, num_kv_heads, head_dim)
    assert cos.shape[-1] >= head_dim // 2 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        QH_PAD=triton.next_power_of_2(num_q_heads), KH_PAD=triton.next_power_of_2(num_kv_heads),
        HALF_PAD=triton.next_power_of_2(half), num_warps=4,
    )
    return q_out, k_out


def rotary_embedding_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               cos: torch.Tensor, sin: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """pagewire.model.layers.RotaryEmbedding.forward over the same tables."""
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
