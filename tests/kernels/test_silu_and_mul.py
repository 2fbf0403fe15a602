"""SiLU-and-multiply against the engine's silu_and_mul."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, rel_error, require_triton

require_triton()

from pagewire.kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference  # noqa: E402
from pagewire.model.layers import silu_and_mul as engine_silu_and_mul  # noqa: E402


@pytest.mark.parametrize("shape, block", [((7, 2 * 96), 1024), ((3, 2 * 1536), 512),
                                          ((2, 3, 2 * 40), 16)])
def test_matches_the_engines(shape, block):
    gate_up = (4 * torch.randn(*shape, generator=torch.Generator().manual_seed(1))).to(DEVICE)
    out = silu_and_mul(gate_up, block=block)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert rel_error(out, engine_silu_and_mul(gate_up)) < 1e-6


def test_float16():
    gate_up = torch.randn(5, 2 * 300, generator=torch.Generator().manual_seed(2)).half()
    gate_up = gate_up.to(DEVICE)
    out = silu_and_mul(gate_up)
    assert out.dtype == torch.float16
    assert rel_error(out, silu_and_mul_reference(gate_up.float())) < 2e-3
