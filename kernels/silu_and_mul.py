"""SiLU-and-multiply of the fused gate/up projection: [T, 2I] -> silu(gate) * up, [T, I].

Rounds silu(gate) to the input dtype before the product, as torch does in
pagewire.model.layers.silu_and_mul, so the two agree to one rounding in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up [..., 2I] -> [..., I] in gate_up's dtype."""
    n_cols = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*gate_up.shape[:-1], n_cols, dtype=gate_up.dtype, device=gate_up.device)
    out2 = out.view(-1, n_cols)
    if x2.shape[0] > 0:
        block = min(block, triton.next_power_of_2(n_cols))
        grid = (x2.shape[0], triton.cdiv(n_cols, block))
        _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), n_cols, BLOCK=block,
                                   num_warps=4)
    return out


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """pagewire.model.layers.silu_and_mul."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
