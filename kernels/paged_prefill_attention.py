"""Prefill / extend attention over the paged KV cache for variable-length query chunks.

Sequence b's queries are rows query_start_loc[b]:query_start_loc[b+1] of q; its context is
seq_lens[b] tokens in the paged cache, the chunk's own K/V included (written first, as the
engine does), so its queries sit at positions seq_lens[b] - q_len ... seq_lens[b] - 1. Each
query attends to the cached prefix and, causally, to its own chunk. A decode token is the
case q_len == 1, so a mixed batch runs here too.

One program per (sequence, tile of BLOCK_M queries, q head) streams the context's keys in
tiles of BLOCK_N tokens, gathering each token's block through the block table.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagewire.kernels.paged_decode_attention import f16_dots

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, n0, kv_end, table, k_cache_ptr, v_cache_ptr,
                 kv_head, scale_log2, stride_cb, stride_cs, stride_ch, offs_n, offs_d, d_mask,
                 PAGE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One BLOCK_N tile of keys folded into the running softmax (online, base 2)."""
    tok = n0 + offs_n
    n_mask = tok < kv_end
    block = tl.load(table + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
    row = block * stride_cb + (tok % PAGE) * stride_cs + kv_head * stride_ch
    kv_mask = n_mask[:, None] & d_mask[None, :]
    # An fp8 cache widens to q's type here (a no-op when the cache has q's type).
    k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        # Every real query sees key 0, so no real row is all -inf in the first tile.
        s = tl.where(n_mask[None, :] & (tok[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    F16_DOTS: tl.constexpr,
):
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix + offs_m  # absolute position of each query (pads run past the context)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if F16_DOTS:  # see paged_decode_attention.f16_dots
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys before the tile's first query are visible to every row: no causal mask there.
    # Keys past its last query are hidden from every row: stop there.
    full_end = (prefix + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, n0, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head,
            scale_log2, stride_cb, stride_cs, stride_ch, offs_n, offs_d, d_mask,
            PAGE, False, DOT_PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, n0, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head,
            scale_log2, stride_cb, stride_cs, stride_ch, offs_n, offs_d, d_mask,
            PAGE, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], acc,
             mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
    *, out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
    num_warps: int = 4, num_stages: int = 3, fp8_f16_dots: bool = True,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim] in q's dtype.

    kv_cache [2, num_blocks, block_size, kv_heads, head_dim] (q's dtype or fp8) already holds
    this step's K/V;
    block_tables [B, max_blocks] int32; seq_lens [B] int32 (context after this step);
    query_start_loc [B+1] int32 row offsets into q (it may start past 0: the rows of q before
    query_start_loc[0], e.g. decode tokens, are left alone); max_query_len bounds every chunk.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, cache_dim = kv_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert query_start_loc.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    batch = seq_lens.shape[0]
    if batch == 0 or max_query_len == 0:
        return out
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (batch, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        F16_DOTS=fp8_f16_dots and f16_dots(q.dtype, kv_cache.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time, in q's dtype. Rows of q
    outside every chunk come back as zeros."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(seq_lens.shape[0]):
        lo, hi, n = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        blocks = block_tables[b, : math.ceil(n / block_size)].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:n].to(q.dtype).repeat_interleave(group, dim=1)
        v = kv_cache[1, blocks].flatten(0, 1)[:n].to(q.dtype).repeat_interleave(group, dim=1)
        q_pos = torch.arange(n - (hi - lo), n, device=q.device)
        allowed = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [q, n]
        scores = torch.einsum("qhd,nhd->hqn", q[lo:hi], k) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[lo:hi] = torch.einsum("hqn,nhd->qhd", scores.softmax(-1), v)
    return out
