"""KV blocks in and out of a parallel engine. Each rank's cache holds its own part of the KV:
its KV heads (TP), its layers (PP), or both. What leaves the engine (an export) and what enters
it (an import) is whole, in the single-device layout [n, layers, 2, block_size, kv_heads,
head_dim]. So a transfer between engines of different shapes (prefill TP=2 to decode TP=1, PP=2
to PP=1, or the reverse) is the same bytes as between equal ones: each side assembles or cuts
its parts at its own edge.
"""

from __future__ import annotations

import torch

from pagewire.parallel.partition import Slice


def gather_blocks(group, parts: list[tuple[Slice, Slice]], local: torch.Tensor,
                  num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """Every rank's local blocks [n, its layers, 2, bs, its kv heads, D] -> the whole KV, on
    every rank. parts: each rank's (layers, heads), in rank order. Padded to the largest part
    for the collective; heads replicated on several ranks are written once per copy, alike."""
    max_layers = max(layers.size for layers, _ in parts)
    max_heads = max(heads.size for _, heads in parts)
    wire = local
    if wire.dtype.itemsize == 1 and wire.dtype != torch.uint8:  # fp8: move the bytes
        wire = wire.view(torch.uint8)
    if wire.shape[1] < max_layers or wire.shape[-2] < max_heads:  # pads [.., layers, .., heads, D]
        wire = torch.nn.functional.pad(wire, (0, 0, 0, max_heads - wire.shape[-2], 0, 0, 0, 0,
                                              0, max_layers - wire.shape[1]))
    wire = wire.contiguous()
    gathered = group.all_gather(wire)
    full = torch.empty((local.shape[0], num_layers, *local.shape[2:-2], num_kv_heads,
                        local.shape[-1]), dtype=wire.dtype, device=local.device)
    for (layers, heads), part in zip(parts, gathered):
        full[:, layers.start:layers.stop, ..., heads.start:heads.stop, :] = \
            part[:, :layers.size, ..., :heads.size, :]
    return full.view(local.dtype)


def own_part(blocks: torch.Tensor, layers: Slice, heads: Slice) -> torch.Tensor:
    """This rank's part of whole blocks [n, layers, 2, bs, kv_heads, D] (an import)."""
    return blocks[:, layers.start:layers.stop, ..., heads.start:heads.stop, :]


def broadcast_blocks(group, blocks: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    """Rank 0's imported blocks (whole) to every rank."""
    wire_dtype = torch.uint8 if dtype.itemsize == 1 else dtype
    if blocks is None:
        blocks = torch.empty(shape, dtype=wire_dtype, device=group.device)
    else:
        blocks = blocks.to(device=group.device, dtype=dtype).contiguous().view(wire_dtype)
    return group.broadcast(blocks).view(dtype)
