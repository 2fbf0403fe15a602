"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`), 4 or 8 bits:

    qweight  int32 [K * bits / 32, N]  packed along the input dim (value k in bits
                                       (k % (32/bits)) * bits of word k // (32/bits))
    qzeros   int32 [G, N * bits / 32]  packed along the output dim, the same way
    scales   [G, N]
    g_idx    int32 [K]                 each input row's group; with act-order (desc_act) the
                                       quantizer visited rows by decreasing Hessian diagonal,
                                       so a group's rows are scattered

w[k, n] = (q[k, n] - z[g, n]) * s[g, n], g = g_idx[k]. The original format (AutoGPTQ,
`checkpoint_format: gptq`, the default) stores z - 1 in qzeros; GPTQModel's `gptq_v2` stores
z. The zero point is read as the checkpoint's own kernels read it (v1: the stored nibble + 1,
with no wrap-around).
"""

from __future__ import annotations

from pagewire.model.quantization.packed_checkpoint import (
    PackedFormat,
    WeightOnlyScheme,
    sorted_by_group,
    to_layout,
    unpack_cols,
)
from pagewire.model.quantization.weight_only import unpack_rows


class GptqFormat(PackedFormat):
    def __init__(self, config: dict):
        bits, group = int(config.get("bits", 4)), int(config.get("group_size", 128))
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with {bits} bits: pagewire loads 4- and 8-bit GPTQ")
        self.scheme = WeightOnlyScheme(bits, group, bool(config.get("desc_act", False)))
        self.v1 = config.get("checkpoint_format", "gptq") != "gptq_v2"

    def parts(self):
        base = {"qweight", "qzeros", "scales"}
        return frozenset(base | {"g_idx"} if self.scheme.act_order else base)

    def ignored(self):
        # Without act-order g_idx is k // group_size: nothing to read.
        return frozenset() if self.scheme.act_order else frozenset({"g_idx"})

    def convert(self, parts):
        bits = self.scheme.bits
        q = unpack_rows(parts["qweight"], bits)
        zeros = unpack_cols(parts["qzeros"], bits) + (1 if self.v1 else 0)
        group = q.shape[0] if self.scheme.group_size == -1 else self.scheme.group_size
        perm = None
        if self.scheme.act_order:
            q, perm = sorted_by_group(q, parts["g_idx"], group)
        return to_layout(q, zeros, parts["scales"], bits, perm)

