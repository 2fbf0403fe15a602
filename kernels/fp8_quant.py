"""Per-token (per-row) dynamic fp8 quantization of activations, the input of every fp8 GEMM of
`quantization="fp8"` (pagewire.model.quantization.fp8): [T, K] -> e4m3 values [T, K] and
float32 scales [T, 1], with x ~= values * scale and each row's largest |x| mapped to 448.

One program per row, two passes over it (its amax, then the scaled cast) in one launch, where
the torch reference takes four kernels and four passes; the arithmetic is the reference's
(the scale divides, it is not inverted), so the two agree bit for bit on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
MIN_SCALE = 1e-12


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols,
                          FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < n_cols, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0), MIN_SCALE) / FP8_MAX
    tl.store(scale_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        # IEEE division, as torch's: Triton's `/` is the GPU's approximate one (within 2 ulp),
        # and one ulp can land a value on the other side of an fp8 rounding (on an H100 the
        # check found values one fp8 step off torch's, rel err 7e-9, until this).
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def per_token_fp8(x: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (any float dtype, unit stride along K) -> (float8_e4m3fn [T, K], float32 [T, 1])."""
    assert x.dim() == 2 and x.stride(-1) == 1
    rows, cols = x.shape
    values = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _per_token_fp8_kernel[(rows,)](x, values, scales, x.stride(0), values.stride(0), cols,
                                       FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                                       BLOCK=min(block, triton.next_power_of_2(cols)),
                                       num_warps=4)
    return values, scales


def per_token_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pagewire.model.quantization.fp8.quantize_rows."""
    from pagewire.model.quantization.fp8 import quantize_rows

    return quantize_rows(x)
