"""Weight-only integer quantization (W4A16, W8A16): the weights held as 4- or 8-bit integers in
groups along the input dimension, the activations left in the model's dtype. GPTQ, AWQ,
compressed-tensors' pack-quantized W4A16/W8A16 and GGUF's block formats all load into this one
layout (each format's converter, in the files beside this one, undoes its own packing once, at
load), so one kernel serves them all:

    qweight  int32 [K * bits / 32, N]  value k of column n is bits (k % (32/bits)) * bits of
                                       word k // (32/bits): packed along the input dim K, as
                                       GPTQ packs it, so a GEMM's K-loop reads whole words
    scales   [G, N] (model dtype)      G = K / group_size
    offsets  [G, N] (model dtype)      w[k, n] = q[k, n] * scales[g, n] + offsets[g, n],
                                       g = k // group_size (an integer zero point z is folded
                                       in at load: offsets = -z * scales)
    perm     int64 [K], only for GPTQ's act-order: the rows are stored sorted by group, so a
             group's rows are contiguous; the input's columns are gathered the same way.

The folded offset (rather than a zero point) is what lets GGUF's float minimums (Q4_1, Q4_K)
share the layout with GPTQ's integer zeros. On CUDA, small batches (decode) run the Triton
kernel kernels/weight_only_gemm.py, which dequantizes inside the GEMM and so reads 4 bits per
weight; larger ones dequantize the layer once and multiply in the model's dtype (compute-bound
there, so the unpacking is a small share). On CPU, decode-sized batches run a C++ kernel
(model/csrc/weight_only_gemm.cpp) that reads each weight's 4 bits once; larger ones dequantize
per call to float32 and multiply (exact either way; speeds in loadtests/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from pagewire.model.cpu_kernels import weight_only_gemm_op

# Above this many rows the GEMM is compute-bound: dequantize once and use cuBLAS (CUDA) or
# MKL (CPU). Measured on CPU, weights streaming from memory (loadtests/RESULTS.md): the C++
# kernel is 1.82x a float32 layer at 1 row, 1.24x at 4, 0.63x at 16, and 4.6x faster than
# dequantize-then-multiply at 16 rows.
KERNEL_MAX_ROWS = 32
CPU_KERNEL_MAX_ROWS = 16


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers q [K, N] (each < 2^bits) -> int32 [K * bits / 32, N], packed along K."""
    per_word = 32 // bits
    k, n = q.shape
    assert k % per_word == 0, f"K={k} is not a multiple of {per_word}"
    q = q.to(torch.int64).view(k // per_word, per_word, n)
    shifts = (torch.arange(per_word, device=q.device) * bits).view(1, -1, 1)
    words = (q << shifts).sum(dim=1)  # disjoint bit fields: the sum is their OR
    return (words - ((words >= 2 ** 31).long() << 32)).to(torch.int32)  # two's complement


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_rows' inverse: int32 [K * bits / 32, N] -> int32 [K, N] in [0, 2^bits)."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits)
    values = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, qweight.shape[1])


class WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 dtype: torch.dtype, act_order: bool = False, bias: torch.Tensor | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
        if in_features % group_size or group_size % (32 // bits):
            raise ValueError(f"group size {group_size} must divide the input width "
                             f"{in_features} and be a multiple of {32 // bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype,
                                                  device=device))
        self.register_buffer("offsets", torch.zeros(groups, out_features, dtype=dtype,
                                                    device=device))
        self.register_buffer("perm", torch.arange(in_features, device=device)
                             if act_order else None)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def empty_like(cls, linear: nn.Linear, bits: int, group_size: int,
                   act_order: bool = False) -> WeightOnlyLinear:
        """A layer of linear's shape for a checkpoint's tensors to load into."""
        bias = None if linear.bias is None else linear.bias.data
        return cls(linear.in_features, linear.out_features, bits, group_size,
                   linear.weight.dtype, act_order, bias, linear.weight.device)

    @torch.no_grad()
    def init_dummy(self, generator: torch.Generator) -> None:
        """Random weights of std ~0.02, as init_dummy_weights draws full-precision ones: every
        bit pattern is a valid packed word; q is uniform on [0, 2^bits), centred by offsets."""
        self.qweight.random_(-2 ** 31, 2 ** 31, generator=generator)
        levels = 1 << self.bits
        self.scales.fill_(0.02 / ((levels ** 2 - 1) / 12) ** 0.5)
        self.offsets.copy_(self.scales * -(levels - 1) / 2)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] this layer computes with, columns in the stored (sorted) order."""
        q = unpack_rows(self.qweight, self.bits).view(-1, self.group_size, self.out_features)
        w = q.to(dtype) * self.scales.to(dtype).unsqueeze(1) + \
            self.offsets.to(dtype).unsqueeze(1)
        return w.view(self.in_features, self.out_features).t()

    def reference_weight(self) -> torch.Tensor:
        """The float32 weight [N, K] in the checkpoint's input order (tests' reference)."""
        w = self.dequantized_weight()
        if self.perm is None:
            return w
        return torch.empty_like(w).index_copy_(1, self.perm, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if x.is_cuda and x2.shape[0] <= KERNEL_MAX_ROWS:
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            from pagewire.kernels.weight_only_gemm import weight_only_gemm  # CUDA: triton

            out = weight_only_gemm(x2, self.qweight, self.scales, self.offsets, self.bits,
                                   self.group_size)
        elif not x.is_cuda and x2.shape[0] <= CPU_KERNEL_MAX_ROWS and \
                (op := weight_only_gemm_op()) is not None:
            out = op.weight_only_gemm(x2.float(), self.qweight, self.scales, self.offsets,
                                      self.bits, self.group_size).to(x.dtype)
        else:
            compute = x.dtype if x.is_cuda else torch.float32
            out = (x2.to(compute) @ self.dequantized_weight(compute).t()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)
