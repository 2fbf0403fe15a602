"""Per-token fp8 quantization against the engine's torch reference (quantize_rows): the same
scales, the same e4m3 values (bar the CPU interpreter's known rounding slip), rows of any width
(one block or several), zero rows finite. On CPU through Triton's interpreter, whose fp8
rounding slips in two known ways (forgiven exactly, nothing else); loadtests/gpu_kernels_check.py
is where the GPU's bits are compared."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, require_triton

require_triton()

from pagewire.kernels.fp8_quant import per_token_fp8, per_token_fp8_reference  # noqa: E402


@pytest.mark.parametrize("rows, cols, block, dtype", [
    (7, 96, 4096, torch.float32), (3, 1000, 256, torch.float32), (5, 320, 64, torch.bfloat16)])
def test_matches_the_reference(rows, cols, block, dtype):
    generator = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 3, rows).view(-1, 1)
    x[-1] = 0  # an all-zero row keeps a finite scale
    x = x.to(dtype).to(DEVICE)
    values, scales = per_token_fp8(x, block=block)
    want_values, want_scales = per_token_fp8_reference(x)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (rows, 1)
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0)
    ours, theirs = values.float(), want_values.float()
    if DEVICE == "cpu":
        ours = _undo_interpreter_slips(ours, theirs, x.float() / want_scales)
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours).all() and ours[:-1].abs().amax(dim=1).eq(448).all()


def _undo_interpreter_slips(ours, theirs, exact):
    """The CPU interpreter's fp8 rounding slips, forgiven exactly and nothing else: the carry
    into the next power of two lands a binade low (tests.kernels.helpers); an exact tie rounds
    away from zero where the GPU and torch round it to even (42, halfway between 40 and 44,
    becomes 44; bf16 inputs make such ties common); and a subnormal (below 2^-6) may land one
    subnormal step (2^-9) off."""
    wrong = ours != theirs
    carry = (torch.log2(theirs.abs()).frac() == 0) & (ours == theirs / 2)
    tie = (ours + theirs) / 2 == exact
    subnormal = (exact.abs() < 2 ** -6) & ((ours - theirs).abs() == 2 ** -9)
    assert (wrong <= (carry | tie | subnormal)).all(), "not one of the interpreter's slips"
    return torch.where(wrong, theirs, ours)
