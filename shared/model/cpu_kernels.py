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
_modules: dict[str, object] = {}
_failed: set[str] = set()


def paged_decode_attention_op():
    """The compiled paged decode attention, or None when it cannot be built here."""
    return _compiled("paged_decode_attention", "pagewire_cpu_attention")


def weight_only_gemm_op():
    """The compiled weight-only GEMM (quantization/weight_only.py), or None."""
    return _compiled("weight_only_gemm", "pagewire_cpu_weight_only_gemm")


def _compiled(source: str, name: str):
    if source in _modules or source in _failed:
        return _modules.get(source)
    with _lock:
        if source not in _modules and source not in _failed:
            try:
                _modules[source] = _build(source, name)
            except Exception as exc:  # any toolchain failure means: use the torch path
                _failed.add(source)
                print(f"pagewire: CPU kernel {source} unavailable ({exc}); using torch",
                      flush=True)
    return _modules.get(source)


def _build(source: str, name: str):
    from torch.utils.cpp_extension import load

    from pagewire.model.model_source import cache_root

    build_dir = cache_root() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    path = Path(__file__).parent / "csrc" / f"{source}.cpp"
    flags = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
    return load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
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
