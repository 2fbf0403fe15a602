"""compressed-tensors' INT8 W8A8: int8 weights with one scale per output channel (or per
tensor), activations quantized to int8 per token at run time (symmetric, dynamic).

On CUDA the GEMM is `torch._int_mm` (int8 x int8 -> int32 on the tensor cores) where its
shape rules allow (more than 16 rows; both dims multiples of 8), then both scales; elsewhere the
same integers are multiplied in float32 (exact: every product and partial sum is an integer far
below 2^24 for these widths) and scaled the same way.
"""

from __future__ import annotations

import torch

from pagewire.model.quantization.layer import QuantizedLinear

INT8_MAX = 127.0
MIN_SCALE = 1e-12


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (int8 values [rows, k], float32 scales [rows, 1]), round to nearest."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_SCALE) / INT8_MAX
    return (x.float() / scale).round().clamp(-128, 127).to(torch.int8), scale


class Int8Linear(QuantizedLinear):
    WEIGHT_DTYPE = torch.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_q, x_scale = quantize_rows_int8(x2)
        rows = x2.shape[0]
        if x.is_cuda and rows > 16 and self.in_features % 8 == 0 and \
                self.out_features % 8 == 0:
            acc = torch._int_mm(x_q, self.weight.t()).float()
        else:
            acc = x_q.float() @ self.weight.float().t()
        out = (acc * x_scale * self.weight_scale.view(1, -1)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)
