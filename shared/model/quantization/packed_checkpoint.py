"""What GPTQ, AWQ and compressed-tensors' pack-quantized checkpoints share: each stores one
projection as several tensors (packed integers, scales, zero points, act-order indices) under
the projection's name, which must be read together before the layer's own layout
(weight_only.py) can be built. `regroup` collects them as the checkpoint streams by (a
projection's parts lie side by side in sorted safetensors files, so little is held at once)
and hands each complete set to the format's converter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from pagewire.model.quantization.weight_only import pack_rows, unpack_rows


@dataclass(frozen=True)
class WeightOnlyScheme:
    bits: int
    group_size: int  # -1: one group per output channel (the whole input width)
    act_order: bool = False


class PackedFormat:
    """One checkpoint format: the parts of a projection it stores and how they convert."""

    scheme: WeightOnlyScheme

    def parts(self) -> frozenset[str]:
        """The suffixes of one projection's tensors that must all arrive."""
        raise NotImplementedError

    def ignored(self) -> frozenset[str]:
        """Suffixes stored but not needed (GPTQ's g_idx without act-order)."""
        return frozenset()

    def convert(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """-> {"qweight", "scales", "offsets"[, "perm"]} in weight_only's layout, float32
        scales and offsets (the weight loader casts them to the model's dtype)."""
        raise NotImplementedError


def regroup(weights: Iterable[tuple[str, torch.Tensor]],
            fmt: PackedFormat) -> Iterator[tuple[str, torch.Tensor]]:
    parts, ignored = fmt.parts(), fmt.ignored()
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, suffix = name.rpartition(".")
        if suffix in ignored:
            continue
        if suffix == "bias" and _is_projection(prefix) and not tensor.any():
            continue  # AutoGPTQ stores zero biases for layers that have none
        if suffix not in parts:
            yield name, tensor
            continue
        group = pending.setdefault(prefix, {})
        group[suffix] = tensor
        if parts <= group.keys():
            del pending[prefix]
            for key, value in fmt.convert(group).items():
                yield f"{prefix}.{key}", value
    if pending:
        prefix, group = next(iter(pending.items()))
        raise ValueError(f"{prefix}: the checkpoint lacks {sorted(parts - group.keys())}")


def _is_projection(prefix: str) -> bool:
    return prefix.endswith("_proj")


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C * bits / 32] packed along the columns -> int32 [R, C]."""
    return unpack_rows(packed.t().contiguous(), bits).t()


def group_size_of(scheme: WeightOnlyScheme, in_features: int) -> int:
    return in_features if scheme.group_size in (-1, None) else scheme.group_size


def sorted_by_group(q: torch.Tensor, g_idx: torch.Tensor, group_size: int, name: str = ""
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Act-order: q's rows [K, N] each belong to group g_idx[k] (in an order the quantizer
    chose); sorted by group (stably), each group's rows are contiguous, which is the layout the
    kernel reads. -> (sorted rows, the permutation: sorted row i is input column perm[i])."""
    perm = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(q.shape[0], device=q.device) // group_size
    if not torch.equal(g_idx.long()[perm], expected):
        raise ValueError(f"{name}: g_idx does not give every group {group_size} rows")
    return q.index_select(0, perm), perm


def to_layout(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
              perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Unsigned q [K, N], integer zero points and scales [G, N] -> weight_only's tensors,
    w = (q - z) * s folded into q * s + (-z * s)."""
    scales = scales.float()
    out = {"qweight": pack_rows(q, bits), "scales": scales, "offsets": -zeros.float() * scales}
    if perm is not None:
        out["perm"] = perm
    return out
