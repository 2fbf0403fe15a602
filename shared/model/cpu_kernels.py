"""Native CPU kernels, compiled on first use with the machine's C++ compiler (cached under
$PAGEWIRE_CACHE_DIR/torch_extensions). Every kernel has a torch fallback: if the build fails
(no compiler), the engine keeps the pure-torch path and says so once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

_lock = threading.Lock()
_module = None
_failed = False


def paged_decode_attention_op():
    """The compiled op, or None when it cannot be built here."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                _module = _build()
            except Exception as exc:  # any toolchain failure means: use the torch path
                _failed = True
                print(f"pagewire: CPU attention kernel unavailable ({exc}); using torch",
                      flush=True)
    return _module


def _build():
    from torch.utils.cpp_extension import load

    from pagewire.model.model_source import cache_root

    build_dir = cache_root() / "torch_extensions"
    build_dir.mkdir(parents=True, exist_ok=True)
    source = Path(__file__).parent / "csrc" / "paged_decode_attention.cpp"
    flags = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
    return load(name="pagewire_cpu_attention", sources=[str(source)],
                extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir), verbose=os.environ.get("PAGEWIRE_VERBOSE") == "1")


def paged_decode_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    """The same function in plain torch, one sequence at a time (for tests)."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:n]  # [n, KVH, D]
        v = kv_cache[1, blocks].flatten(0, 1)[:n]
        group = q.shape[1] // num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out
