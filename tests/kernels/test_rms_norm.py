"""Fused residual-add + RMSNorm against its reference and the engine's RMSNorm module."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, rel_error, require_triton

require_triton()

from pagewire.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from pagewire.model.layers import RMSNorm  # noqa: E402


def _inputs(seed, shape, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(dtype)
    residual = torch.randn(*shape, generator=gen).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    return x.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE)


@pytest.mark.parametrize("shape", [(5, 64), (3, 576), (2, 4, 96)])
def test_matches_the_engines_module(shape):
    x, residual, weight = _inputs(shape[-1], shape, torch.float32)
    module = RMSNorm(shape[-1], eps=1e-5).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(weight)
        assert rel_error(rms_norm(x, weight, 1e-5), module(x)) < 1e-6
        out, new_residual = rms_norm(x, weight, 1e-5, residual)
        ref_out, ref_residual = module(x, residual)
    assert torch.equal(new_residual, ref_residual)
    assert rel_error(out, ref_out) < 1e-6


def test_float16_and_large_eps():
    x, residual, weight = _inputs(1, (4, 200), torch.float16)
    out, new_residual = rms_norm(x, weight, 1e-2, residual)
    ref_out, ref_residual = rms_norm_reference(x.float(), weight.float(), 1e-2,
                                               residual.float())
    assert out.dtype == torch.float16
    assert rel_error(new_residual, ref_residual) < 1e-3
    assert rel_error(out, ref_out) < 2e-3


def test_strided_rows():
    """A view whose rows are not packed (every other row) still normalizes row by row."""
    x, _, weight = _inputs(2, (8, 64), torch.float32)
    assert rel_error(rms_norm(x[::2], weight, 1e-6), rms_norm_reference(x[::2], weight, 1e-6)
                     ) < 1e-6
