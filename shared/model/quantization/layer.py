"""What every quantized projection shares: a weight of `WEIGHT_DTYPE` [out, in] with one float32
scale per output row, kept as buffers (the weight loader writes them, `.to()` moves them), and
the bias as it was. Subclasses say how the activations are quantized and the GEMM is done."""

from __future__ import annotations

import torch
from torch import nn


class QuantizedLinear(nn.Module):
    WEIGHT_DTYPE: torch.dtype

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in] WEIGHT_DTYPE
        self.register_buffer("weight_scale", weight_scale)  # [out] float32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> QuantizedLinear:
        """A layer of linear's shape for a checkpoint's weights and scales to load into."""
        device = linear.weight.device
        weight = torch.empty(linear.weight.shape, dtype=cls.WEIGHT_DTYPE, device=device)
        scale = torch.ones(linear.out_features, dtype=torch.float32, device=device)
        bias = None if linear.bias is None else linear.bias.data
        return cls(weight, scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with (tests' reference)."""
        return self.weight.float() * self.weight_scale.view(-1, 1)
