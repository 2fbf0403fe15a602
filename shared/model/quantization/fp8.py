"""`fp8`: weights quantized at load to float8 e4m3 with one scale per output channel, and
activations quantized per token at run time (dynamic scales), as vLLM's online fp8 does.

On a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper) the activations are
quantized by one Triton kernel (kernels/fp8_quant.py) and the GEMM is `torch._scaled_mm` with
row-wise scales: fp8 x fp8 at twice bf16's rate, reading half the weight bytes. Elsewhere
(CPU, older GPUs) the same quantized values are dequantized and multiplied in float32: the same
numbers, so a CPU test checks what the GPU computes, at float32 speed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pagewire.model.quantization.layer import QuantizedLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row or token keeps a finite scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (fp8 values [rows, k], float32 scales [rows, 1]): x ~= values * scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_SCALE) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def _has_fp8_gemm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(QuantizedLinear):
    WEIGHT_DTYPE = FP8

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight, scale = quantize_rows(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        return cls(weight, scale.view(-1), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if _has_fp8_gemm(x.device):
            from pagewire.kernels.fp8_quant import per_token_fp8  # CUDA only: needs triton

            x_q, x_scale = per_token_fp8(x2 if x2.stride(-1) == 1 else x2.contiguous())
            # Row-wise scales: [tokens, 1] and [1, out]; the weight's transpose is column-major,
            # the layout the fp8 GEMM wants.
            out = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale,
                                   scale_b=self.weight_scale.view(1, -1), out_dtype=x.dtype)
        else:
            x_q, x_scale = quantize_rows(x2)
            out = ((x_q.float() * x_scale) @ self.dequantized_weight().t()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)
