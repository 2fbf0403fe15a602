"""Attention over the paged KV cache: the metadata one step needs, and the torch backend.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, values). A token's slot is block_id * block_size + offset. Every step:
  1. the new tokens' K/V are written into their slots (slot_mapping);
  2. each sequence's queries attend to its whole context, gathered from its blocks.

The batch is ordered decode sequences first (one query each), then prefill chunks (many
queries each, causal after any cached prefix). The torch backend pads each of the two groups
to a rectangle and runs one scaled_dot_product_attention per group; the index tensors for the
gathers are built once per step in AttentionMetadata and shared by every layer. A Triton
backend (kernels/) reads the same metadata on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from pagewire.device_copies import to_device
from pagewire.model.cpu_kernels import paged_decode_attention_op


@dataclass
class AttentionGroup:
    """A rectangle of sequences padded to the same query and context length."""

    token_start: int  # first flat token of the group
    token_end: int
    query_index: torch.Tensor  # [B, Q] flat token index of each query (pads point at token_start)
    output_rows: torch.Tensor  # [Tg] rows of the flattened [B*Q] output that are real queries
    context_blocks: torch.Tensor  # [B, NB] block ids covering each context (pads: block 0)
    mask: torch.Tensor  # [B, 1, Q, NB*block_size] bool, True where the query may attend

    @property
    def is_decode(self) -> bool:
        return self.query_index.shape[1] == 1


@dataclass
class AttentionMetadata:
    """What one step's attention needs, built once per step and shared by every layer.

    The plain per-sequence tensors serve backends that walk block tables themselves (Triton);
    the padded rectangles of the torch backend (`groups`) are built only when first asked for.
    """

    slot_mapping: torch.Tensor  # [T] cache slot for each new token
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    num_decode_seqs: int
    max_query_len: int
    max_seq_len: int
    _query_lens: list[int] = field(repr=False)
    _context_lens: list[int] = field(repr=False)
    _block_table_lists: list[list[int]] = field(repr=False)
    _block_size: int = field(repr=False)

    @cached_property
    def groups(self) -> list[AttentionGroup]:
        """Decode sequences, then prefill chunks, each padded to one rectangle."""
        starts = [0]
        for qlen in self._query_lens:
            starts.append(starts[-1] + qlen)
        num_decode, total = self.num_decode_seqs, len(self._query_lens)
        return [_build_group(self._query_lens[lo:hi], self._context_lens[lo:hi],
                             self._block_table_lists[lo:hi], starts[lo], self._block_size,
                             self.slot_mapping.device)
                for lo, hi in ((0, num_decode), (num_decode, total)) if hi > lo]


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Sequences must come decode-first: query_lens == 1 for the first num_decode seqs.

    context_lens[i] is the number of tokens of sequence i whose KV exists after this step
    (cached prefix + already computed + this step's queries).
    """
    num_decode = 0
    while num_decode < len(query_lens) and query_lens[num_decode] == 1:
        num_decode += 1
    max_blocks = max((len(t) for t in block_tables), default=0)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables],
                          dtype=torch.int32).reshape(len(block_tables), max_blocks)
    qlens = torch.tensor(query_lens, dtype=torch.int32)
    clens = torch.tensor(context_lens, dtype=torch.int32)
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    torch.cumsum(qlens, 0, out=starts[1:])
    # Each new token's position and sequence, then its slot through the block table.
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), qlens.long())
    positions = (clens - qlens)[seq_of_token] + (
        torch.arange(int(starts[-1])) - starts[:-1][seq_of_token])
    slots = tables[seq_of_token, positions // block_size].long() * block_size + \
        positions % block_size
    return AttentionMetadata(
        slot_mapping=to_device(slots, torch.long, device),
        query_start_loc=to_device(starts, torch.int32, device),
        seq_lens=to_device(clens, torch.int32, device),
        block_tables=to_device(tables, torch.int32, device),
        num_decode_seqs=num_decode,
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(context_lens, default=0),
        _query_lens=list(query_lens),
        _context_lens=list(context_lens),
        _block_table_lists=block_tables,
        _block_size=block_size,
    )


def _build_group(query_lens, context_lens, block_tables, token_start, block_size, device):
    max_q, max_k = max(query_lens), max(context_lens)
    k_pos = torch.arange(max_k)
    q_off = torch.arange(max_q)
    qlens = torch.tensor(query_lens)
    clens = torch.tensor(context_lens)
    seq_starts = token_start + torch.cumsum(qlens, 0) - qlens
    query_valid = q_off[None, :] < qlens[:, None]
    query_index = torch.where(query_valid, seq_starts[:, None] + q_off[None, :], token_start)
    # Absolute position of each query: the context's last qlen positions.
    q_pos = (clens - qlens)[:, None] + q_off[None, :]
    causal = k_pos[None, None, :] <= q_pos[:, :, None]
    mask = causal & (k_pos[None, None, :] < clens[:, None, None])
    # Pad queries attend to position 0 so no row is all -inf (NaN); their output is dropped.
    mask |= (~query_valid)[:, :, None] & (k_pos == 0)[None, None, :]
    # Whole blocks are gathered (one contiguous copy each), so the key axis is padded to a
    # multiple of the block size; the mask hides the tail.
    max_blocks = (max_k + block_size - 1) // block_size
    pad = max_blocks * block_size - max_k
    mask = F.pad(mask, (0, pad), value=False)
    tables = torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks]))
                           for t in block_tables])
    return AttentionGroup(
        token_start=token_start,
        token_end=token_start + int(qlens.sum()),
        query_index=query_index.to(device),
        output_rows=query_valid.flatten().nonzero().squeeze(1).to(device),
        context_blocks=tables.to(device),
        mask=mask[:, None].to(device),
    )


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim].

    k and v are cast to the cache's type (a no-op in the engine, where they have it already).
    An fp8 cache stores them saturated to its range, through a byte view (torch has no
    index_copy_ for fp8 on CPU)."""
    flat = kv_cache.flatten(1, 2)
    if kv_cache.dtype == torch.float8_e4m3fn:
        flat = flat.view(torch.uint8)
        k, v = (t.clamp(-FP8_MAX, FP8_MAX).to(kv_cache.dtype).view(torch.uint8) for t in (k, v))
    else:
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


class TorchPagedAttention:
    """Reference attention backend: gathers context K/V and calls SDPA once per group."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim]; returns [T, heads*head_dim]."""
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        native = paged_decode_attention_op() if _native_ok(q, kv_cache) else None
        for group in meta.groups:
            if group.is_decode and native is not None:
                nd = meta.num_decode_seqs
                out[:nd] = native.paged_decode_attention(
                    q[:nd].contiguous(), kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                    self.scale)
                continue
            if group.is_decode:  # one query per sequence, already in order: no gather
                qg = q[group.token_start:group.token_end].unsqueeze(1)
            else:
                qg = q[group.query_index]  # [B, Q, H, D]
            # One gather for keys and values: [2, B, NB, block_size, KVH, D] -> [2, B, K, KVH, D]
            kv = kv_cache[:, group.context_blocks].flatten(2, 3).to(q.dtype)
            og = F.scaled_dot_product_attention(
                qg.transpose(1, 2), kv[0].transpose(1, 2), kv[1].transpose(1, 2),
                attn_mask=group.mask, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            ).transpose(1, 2)
            if group.is_decode:
                out[group.token_start:group.token_end] = og.squeeze(1)
            else:
                out[group.token_start:group.token_end] = og.flatten(0, 1)[group.output_rows]
        return out.flatten(1)


def _native_ok(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == kv_cache.dtype == torch.float32
