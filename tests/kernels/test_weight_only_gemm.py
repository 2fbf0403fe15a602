"""The weight-only GEMM (W4A16, W8A16) against its torch reference (dequantize to float32, then
multiply): 4 and 8 bits, groups of 16 to 128 (GGUF's Q6_K blocks to GPTQ's), one row to a
decode batch's worth, column counts that do not fill the last block, and split-K slices that
do not divide K evenly. On CPU through Triton's interpreter, in float32 (error only from the
order of the sums); loadtests/gpu_kernels_check.py runs the same comparison in bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, rel_error, require_triton

require_triton()

from pagewire.kernels.weight_only_gemm import (  # noqa: E402
    choose_split_k,
    weight_only_gemm,
    weight_only_gemm_reference,
)
from pagewire.model.quantization.weight_only import pack_rows  # noqa: E402


def _layer(k, n, bits, group, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=generator)
    scales = torch.rand(k // group, n, generator=generator) * 0.01 + 1e-3
    offsets = torch.randn(k // group, n, generator=generator) * 0.02
    return pack_rows(q, bits).to(DEVICE), scales.to(DEVICE), offsets.to(DEVICE)


@pytest.mark.parametrize("m, k, n, bits, group, block_k, split_k", [
    (1, 256, 96, 4, 128, 128, None),  # one row; N not a multiple of the block; scales folded
    (5, 1280, 64, 4, 32, 128, 3),     # groups of 32 (GGUF Q4): dequantized per word row;
                                      # 3 slices of 10 steps: the last slice is short
    (16, 256, 80, 8, 64, 64, 2),      # 8-bit, folded
    (9, 96, 64, 8, 16, 64, 1),        # GGUF Q6_K's groups of 16 (in 8 bits); K ends mid-step
    (3, 576, 48, 4, 32, 256, 1),      # SmolLM2's K = 576: 2.25 steps of 256, stored directly
])
def test_matches_the_reference(m, k, n, bits, group, block_k, split_k):
    qweight, scales, offsets = _layer(k, n, bits, group, seed=m * k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    out = weight_only_gemm(x, qweight, scales, offsets, bits, group, block_k=block_k,
                           split_k=split_k)
    ref = weight_only_gemm_reference(x, qweight, scales, offsets, bits, group)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_error(out, ref) < 1e-5


def test_split_k_covers_the_sms_without_exceeding_the_steps():
    assert choose_split_k(n_blocks=64, k_steps=32, num_sms=132) == 5
    assert choose_split_k(n_blocks=448, k_steps=32, num_sms=132) == 1
    assert choose_split_k(n_blocks=1, k_steps=4, num_sms=132) == 4
