"""Triton kernels, each beside the torch reference it is tested against.

One file per kernel; each holds the Triton kernel(s), a launcher taking the engine's tensors
(paged KV cache [2, num_blocks, block_size, kv_heads, head_dim], block tables, slot mappings,
as shared/model/attention.py builds them) and a short torch reference.

This package must never import triton at import time: CPU-only installs have no triton, and
the engine picks these kernels only on CUDA. Import a kernel module only where triton exists
(`triton_available()`); the modules themselves import triton at the top.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when triton can be imported here (it is not needed on CPU)."""
    return importlib.util.find_spec("triton") is not None
