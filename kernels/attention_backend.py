"""The Triton attention backend: TorchPagedAttention's interface (pagewire.model.attention)
over the Triton kernels, for CUDA.

Reads only AttentionMetadata's plain per-sequence tensors (slot_mapping, query_start_loc,
seq_lens, block_tables, num_decode_seqs) and its host-side bounds (max_seq_len, max_query_len),
so one step never syncs with the device. Decode sequences (first num_decode_seqs) go through the
split-context decode kernel, the rest through the prefill/extend kernel.
"""

from __future__ import annotations

import torch

from pagewire.kernels.kv_cache_write import write_kv_cache
from pagewire.kernels.paged_decode_attention import paged_decode_attention
from pagewire.kernels.paged_prefill_attention import paged_prefill_attention


class TritonPagedAttention:
    """Drop-in for TorchPagedAttention: same constructor, same forward."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim]; returns [T, heads*head_dim].

        kv_cache: one layer's [2, num_blocks, block_size, kv_heads, head_dim]."""
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_seqs, num_decode = meta.seq_lens.shape[0], meta.num_decode_seqs
        if num_decode:
            # Host-side bounds from the metadata: no device sync inside a step.
            paged_decode_attention(
                q[:num_decode], kv_cache, meta.block_tables[:num_decode],
                meta.seq_lens[:num_decode], self.scale, out=out[:num_decode],
                max_seq_len=meta.max_seq_len)
        if num_seqs > num_decode:
            paged_prefill_attention(
                q, kv_cache, meta.block_tables[num_decode:], meta.seq_lens[num_decode:],
                meta.query_start_loc[num_decode:], meta.max_query_len, self.scale, out=out)
        return out.flatten(1)
