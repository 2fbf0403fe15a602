"""Paged decode attention (one query per sequence), split over the context ("flash decoding").

Reads the engine's paged cache as it is: kv_cache [2, num_blocks, block_size, kv_heads,
head_dim], block_tables [B, max_blocks] int32, seq_lens [B] int32 (context length including the
token being decoded, whose K/V is already in the cache). One program per (sequence, kv head,
split) handles every q head of its GQA group, so each K/V row is read once from memory; a
second kernel merges the splits by their log-sum-exp. Splitting keeps the GPU full when the
batch is small and the contexts long.

Never syncs with the device: the split count comes from the block table's width (an upper
bound on every context), not from seq_lens, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, tokens_per_split, num_splits,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, ONE_SPLIT: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    F16_DOTS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if F16_DOTS:
        q = q.to(tl.float16)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        n_mask = tok < end
        block = tl.load(table + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = block * stride_cb + (tok % PAGE) * stride_cs + kv_head * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # An fp8 cache widens to q's type here (a no-op when the cache has q's type).
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (context shorter than its start) is never read by the reduce kernel.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if ONE_SPLIT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 acc, mask=out_mask)
    else:
        part = (seq * NUM_HEADS + heads) * num_splits + split  # [B, H, S] row-major
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
    tokens_per_split, num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_valid = tl.cdiv(seq_len, tokens_per_split)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = (offs_s < num_valid) & (offs_s < num_splits)
    d_mask = offs_d < HEAD_DIM
    part = (seq * NUM_HEADS + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = tl.where(s_mask, weight, 0.0)
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(o * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out, mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
    max_seq_len: int | None = None, num_splits: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int = 3,
    fp8_f16_dots: bool = True,
) -> torch.Tensor:
    """q [B, heads, head_dim] -> [B, heads, head_dim] in q's dtype.

    kv_cache [2, num_blocks, block_size, kv_heads, head_dim] in q's dtype or fp8 (read
    unscaled); block_tables [B, max_blocks]
    int32; seq_lens [B] int32, each >= 1. max_seq_len (an upper bound on seq_lens) defaults to
    the block table's capacity; num_splits defaults to what fills the device.
    """
    batch, num_heads, head_dim = q.shape
    _, _, page, num_kv_heads, cache_dim = kv_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * page
    max_seq_len = max(max_seq_len, 1)
    if num_splits is None:
        num_splits = choose_num_splits(batch * num_kv_heads, max_seq_len, q.device)
    # fp8 without splits: twice the tokens per tile keeps as many bytes in flight, and two
    # warps per program beat four (86-90% of copy bandwidth on an H100 at batch 64-512,
    # against 64-79% at bf16's 64 tokens and four warps); split, bf16's choice measured best.
    wide = kv_cache.element_size() == 1 and num_splits == 1
    if block_n is None:
        block_n = 128 if wide else 64
    if num_warps is None:
        num_warps = 2 if wide else 4
    tokens_per_split = _round_up(-(-max_seq_len // num_splits), block_n)
    num_splits = -(-max_seq_len // tokens_per_split)  # no split starts past every context
    use_f16_dots = fp8_f16_dots and f16_dots(q.dtype, kv_cache.dtype)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    d_pad = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * LOG2E, tokens_per_split, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, ONE_SPLIT=num_splits == 1,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, D_PAD=d_pad, PAGE=page, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), F16_DOTS=use_f16_dots,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, seq_lens, out, tokens_per_split, num_splits,
            out.stride(0), out.stride(1), NUM_HEADS=num_heads,
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, D_PAD=d_pad,
            num_warps=4,
        )
    return out


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Splits only while (sequence, kv head) programs alone leave SMs short of about two
    programs each: on an H100 at batch 64 x 8 kv heads one split measured fastest (and
    91-100% of copy bandwidth); no split is shorter than MIN_SPLIT_TOKENS."""
    wanted = -(-2 * _multiprocessor_count(device) // num_programs)
    return max(1, min(wanted, -(-max_seq_len // MIN_SPLIT_TOKENS), 64))


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on CPU: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def f16_dots(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """bf16 queries over an fp8 cache: dot in float16 instead, to which fp8 widens in one
    instruction (to bf16 it goes through float32, which left the kernel at ~55% of copy
    bandwidth on an H100). float16 holds q's values (|q| < 65504) with more mantissa."""
    return q_dtype == torch.bfloat16 and cache_dtype == torch.float8_e4m3fn


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep float32 products (tf32 would cost ~3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time, in q's dtype."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        blocks = block_tables[b, : math.ceil(n / block_size)].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:n].to(q.dtype).repeat_interleave(group, dim=1)
        v = kv_cache[1, blocks].flatten(0, 1)[:n].to(q.dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out
