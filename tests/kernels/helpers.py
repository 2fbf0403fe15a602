"""What the kernel tests share: skipping without a usable triton, random paged caches, error."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def require_triton() -> None:
    """Skips the calling test module when triton is missing or its interpreter cannot run."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton, or '.[test]')",
                    allow_module_level=True)
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem, allow_module_level=True)


_probe_result: list[str] = []


def _interpreter_problem() -> str:
    """'' when a loop over a loaded bound runs; else why not (triton 3.6's interpreter fails
    with numpy >= 2.4, for one)."""
    if not _probe_result:
        _probe_result.append(_probe())
    return _probe_result[0]


def _probe() -> str:
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(n_ptr, out_ptr):
        total = 0
        for _ in range(0, tl.load(n_ptr), 2):
            total += 1
        tl.store(out_ptr, total)

    n = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    try:
        count[(1,)](n, out)
    except Exception as exc:  # any failure here means the interpreter cannot run our kernels
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}"
                f" ({type(exc).__name__}: {exc}); install a newer triton")
    return "" if int(out) == 3 else "triton's interpreter miscounts a simple loop"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails (returns inf)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm())


def random_block_tables(gen: torch.Generator, seq_lens: list[int], block_size: int,
                        num_blocks: int, extra_columns: int = 1) -> torch.Tensor:
    """Distinct, shuffled (non-contiguous) blocks per sequence, padded past each context with
    live block ids that must never be read."""
    width = max(math.ceil(n / block_size) for n in seq_lens) + extra_columns
    perm = torch.randperm(num_blocks, generator=gen)
    assert width * len(seq_lens) <= num_blocks
    return perm[: width * len(seq_lens)].view(len(seq_lens), width).to(torch.int32)


def undo_interpreter_carry_bug(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Triton's CPU interpreter (3.9) rounds a value to fp8 one binade low when rounding
    carries into the next power of two (127.9 becomes 64, not 128); the GPU converts right
    (loadtests/gpu_kernels_check.py checks exactness there). Only that exact error is
    forgiven: half of a power of two, where the right answer is that power of two."""
    wrong = ours != theirs
    power_of_two = torch.log2(theirs.abs()).frac() == 0
    assert (wrong <= (power_of_two & (ours == theirs / 2))).all(), "not the carry bug"
    return torch.where(wrong, theirs, ours)
