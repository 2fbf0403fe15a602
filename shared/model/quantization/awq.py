"""AWQ checkpoints (AutoAWQ's GEMM layout, `quant_method: awq`, `version: gemm`), 4 bits:

    qweight  int32 [K, N / 8]  packed along the OUTPUT dim, in an interleaved order: nibble i
                               of word j holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i] (the
                               order AutoAWQ's CUDA kernel dequantizes pairs in)
    qzeros   int32 [G, N / 8]  the same packing
    scales   [G, N]

w[k, n] = (q[k, n] - z[g, n]) * s[g, n], g = k // group_size (no act-order, no "+1").
Repacked at load along the input dim, the layout every other format shares.
"""

from __future__ import annotations

import torch

from pagewire.model.quantization.packed_checkpoint import (
    PackedFormat,
    WeightOnlyScheme,
    to_layout,
    unpack_cols,
)

# Column c of a group of 8 sits in nibble AWQ_REVERSE_ORDER[c].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> int32 [R, C], columns in their natural order."""
    nibbles = unpack_cols(packed, 4).reshape(packed.shape[0], -1, 8)
    return nibbles[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


class AwqFormat(PackedFormat):
    def __init__(self, config: dict):
        bits = int(config.get("bits", config.get("w_bit", 4)))
        version = str(config.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not config.get("zero_point", True):
            raise ValueError(f"AWQ {version} with {bits} bits (zero_point="
                             f"{config.get('zero_point', True)}): pagewire loads AWQ's 4-bit "
                             "GEMM layout with zero points")
        group = int(config.get("group_size", config.get("q_group_size", 128)))
        self.scheme = WeightOnlyScheme(4, group)

    def parts(self):
        return frozenset({"qweight", "qzeros", "scales"})

    def convert(self, parts):
        q, zeros = unpack_awq(parts["qweight"]), unpack_awq(parts["qzeros"])
        return to_layout(q, zeros, parts["scales"], 4)
