"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, llm-compressor's output):
one scheme for every Linear layer (a single config group targeting Linear; lm_head ignored).

- W8A8 (`float-quantized` / `int-quantized` / `naive-quantized`): float8 or int8 weights with
  per-channel or per-tensor scales, activations quantized per token at run time. Stored as the
  layer holds them (`weight`, `weight_scale`): Fp8Linear or Int8Linear.
- WnA16 (`pack-quantized`, W4A16 and W8A16): unsigned integers (the signed value + 2^(bits-1))
  packed into int32 along the input dim, 32/bits per word, lowest bits first:

      weight_packed      int32 [N, K * bits / 32]
      weight_scale       [N, G] (G = 1 for the channel strategy)
      weight_zero_point  int32 [N * bits / 32, G], packed along the output dim; asymmetric only
      weight_g_idx       int32 [K]; activation ordering ("actorder") only
      weight_shape       int [2] = (N, K)

  w = (q - zp) * s with q and zp signed, so (u - zp_u) * s in the unsigned values; symmetric
  means zp = 0, an unsigned zero point of 2^(bits-1). Loaded into WeightOnlyLinear.
"""

from __future__ import annotations

import torch

from pagewire.model.quantization.packed_checkpoint import (
    PackedFormat,
    WeightOnlyScheme,
    sorted_by_group,
    to_layout,
)
from pagewire.model.quantization.weight_only import unpack_rows

W8A8_FORMATS = ("float-quantized", "int-quantized", "naive-quantized")


def single_group(config: dict) -> dict | None:
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1 or "Linear" not in (groups[0].get("targets") or ["Linear"]):
        return None
    return groups[0]


def w8a8_type(config: dict) -> str | None:
    """"float" or "int" for the W8A8 family (FP8_DYNAMIC, W8A8 INT8): 8-bit symmetric weights
    by channel or tensor, 8-bit activations of the same type per token, dynamic. None for
    anything else."""
    group = single_group(config)
    if group is None or config.get("format") not in W8A8_FORMATS:
        return None
    weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
    kind = weights.get("type")
    if (kind in ("float", "int") and weights.get("num_bits") == 8
            and weights.get("strategy") in ("channel", "tensor")
            and weights.get("symmetric", True) and not weights.get("dynamic", False)
            and inputs.get("type") == kind and inputs.get("num_bits") == 8
            and inputs.get("strategy") == "token" and inputs.get("dynamic") is True
            and inputs.get("symmetric", True)):
        return kind
    return None


class PackQuantizedFormat(PackedFormat):
    def __init__(self, weights: dict):
        self.bits = int(weights["num_bits"])
        self.symmetric = bool(weights.get("symmetric", True))
        strategy = weights.get("strategy")
        group = int(weights["group_size"]) if strategy == "group" else -1
        act_order = weights.get("actorder") not in (None, False, "static")
        self.scheme = WeightOnlyScheme(self.bits, group, act_order)

    def parts(self):
        parts = {"weight_packed", "weight_scale", "weight_shape"}
        if not self.symmetric:
            parts.add("weight_zero_point")
        if self.scheme.act_order:
            parts.add("weight_g_idx")
        return frozenset(parts)

    def ignored(self):
        return frozenset() if self.scheme.act_order else frozenset({"weight_g_idx"})

    def convert(self, parts):
        bits = self.bits
        n, k = (int(v) for v in parts["weight_shape"].tolist())
        q = unpack_rows(parts["weight_packed"].t().contiguous(), bits)[:k]  # [K, N] unsigned
        scales = parts["weight_scale"].t()  # [G, N]
        if self.symmetric:
            zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
        else:
            zeros = unpack_rows(parts["weight_zero_point"], bits)[:n].t()  # [G, N]
        perm = None
        if self.scheme.act_order:
            q, perm = sorted_by_group(q, parts["weight_g_idx"], self.scheme.group_size)
        return to_layout(q, zeros, scales, bits, perm)


def pack_quantized_format(config: dict) -> PackQuantizedFormat | None:
    """The WnA16 scheme of a pack-quantized checkpoint, or None if it is not one."""
    group = single_group(config)
    if group is None or config.get("format") != "pack-quantized" or \
            group.get("input_activations"):
        return None
    weights = group.get("weights") or {}
    if weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8) or \
            weights.get("strategy") not in ("group", "channel") or weights.get("dynamic"):
        return None
    return PackQuantizedFormat(weights)

