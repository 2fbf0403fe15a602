"""KV blocks in and out of a tensor-parallel engine. Each rank's cache holds its own KV heads;
what leaves the engine (an export) and what enters it (an import) has every head, in the
single-device layout [n, layers, 2, block_size, kv_heads, head_dim]. So a transfer between
engines of different TP sizes (prefill TP=2 to decode TP=1, or the reverse) is the same bytes
as between equal ones: each side cuts or assembles heads at its own edge.
"""

from __future__ import annotations

import torch


def gather_heads(group, shards, local: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Every rank's local blocks [n, L, 2, bs, its kv heads, D] -> all heads, on every rank
    (padded to the widest slice for the collective; replicated heads written once each)."""
    width = max(s.kv_heads.size for s in shards)
    padded = local
    if local.shape[-2] < width:
        padded = torch.nn.functional.pad(local, (0, 0, 0, width - local.shape[-2]))
    wire = padded.contiguous()
    if wire.dtype.itemsize == 1 and wire.dtype != torch.uint8:  # fp8: move the bytes
        wire = wire.view(torch.uint8)
    parts = group.all_gather(wire)
    full = torch.empty((*local.shape[:-2], num_kv_heads, local.shape[-1]), dtype=wire.dtype,
                       device=local.device)
    for shard, part in zip(shards, parts):
        heads = shard.kv_heads
        full[..., heads.start:heads.stop, :] = part[..., :heads.size, :]
    return full.view(local.dtype)


def broadcast_blocks(group, blocks: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    """Rank 0's imported blocks (all heads) to every rank."""
    wire_dtype = torch.uint8 if dtype.itemsize == 1 else dtype
    if blocks is None:
        blocks = torch.empty(shape, dtype=wire_dtype, device=group.device)
    else:
        blocks = blocks.to(device=group.device, dtype=dtype).contiguous().view(wire_dtype)
    return group.broadcast(blocks).view(dtype)
