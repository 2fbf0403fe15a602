"""Checks and times every Triton kernel of kernels/ on a CUDA GPU, in one call.

1. Checks each kernel at Llama-3-8B shapes (32 q heads, 8 kv heads, head_dim 128, hidden
   4096, intermediate 14336, the engine's block size 16) on fresh random bf16 inputs against
   its torch reference computed in float32 on the upcast inputs: ||out - ref|| / ||ref|| must
   stay under 1e-2 (bf16 operands, the device tool's METHOD.md); outputs are poisoned with NaN
   first so an unwritten element fails; the cache write must be exact. Then the Triton
   attention backend against the engine's torch backend on one mixed step, the engine's own
   Llama forward with every kernel swapped in (bound: 1.5x the torch path's own bf16 error),
   and the backend captured in a CUDA graph (it must never sync).
2. Measures the device-to-device copy bandwidth (bytes read + written, 1 GiB buffer).
3. Times paged decode attention for batch 64 at contexts 512, 2048 and 8192 (and batch 8 at
   8192, where splitting the context must pay): achieved bytes/s (K/V read + q read + out
   written) over the copy bandwidth, beside torch's scaled_dot_product_attention on K/V already
   gathered into contiguous tensors (the gather is NOT timed: SDPA alone). Kernel times are
   CUDA-graph replays of back-to-back calls (no launch gaps; each call streams >= 128 MB of
   K/V, beyond the 50 MB L2, so replays cannot hit in L2), median of 10; a sweep of launch
   configurations is timed beside the default. Each timing section runs in its own process.
4. Times the other kernels (events with L2 flushed before each call, median).
Prints a short table last; writes everything to $OUT/gpu_kernels_check.json when OUT is set.

    python loadtests/gpu_kernels_check.py            # on the GPU, from the repo root
    python loadtests/gpu_kernels_check.py --smoke    # on CPU: tiny shapes, interpreter, checks
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python loadtests/gpu_kernels_check.py --sanitize   # every access checked, small shapes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_pagewire() -> None:
    """Makes `pagewire` (shared/) and `pagewire.kernels` (kernels/) of this checkout
    importable without pip install, as pyproject's package-dir mapping does."""
    for name, folder in (("pagewire", ROOT / "shared"), ("pagewire.kernels", ROOT / "kernels")):
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    sys.modules["pagewire"].kernels = sys.modules["pagewire.kernels"]


@dataclass(frozen=True)
class Shapes:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    block_size: int
    num_tokens: int  # rows for the per-token kernels
    decode_batch: int
    decode_max_context: int
    prefill_query_lens: tuple[int, ...]
    prefill_prefix_lens: tuple[int, ...]
    dtype: torch.dtype
    bound: float  # on ||out - ref|| / ||ref||
    spare_columns: int = 1  # live block ids past the longest context in each table row


LLAMA3_8B = Shapes(32, 8, 128, 4096, 14336, 16, 4096, 64, 8192, (1, 300, 1024, 77, 2048),
                   (2047, 0, 1000, 4096, 0), torch.bfloat16, 1e-2)
SMOKE = Shapes(4, 2, 32, 64, 96, 16, 8, 6, 70, (1, 9, 20), (30, 0, 5), torch.float32, 1e-4)
# Under compute-sanitizer: real head shapes, short contexts, block tables exactly as wide as
# the longest context (an index read past a table's end lands outside its allocation).
SANITIZE = Shapes(32, 8, 128, 4096, 14336, 16, 64, 8, 1000, (100, 257, 1), (0, 33, 500),
                  torch.bfloat16, 1e-2, spare_columns=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DECODE_CONTEXTS = (512, 2048, 8192)
SMALL_BATCH = 8  # one extra decode row at the longest context: where splitting must pay


# ---------------------------------------------------------------- checks


class Checker:
    def __init__(self, shapes: Shapes, device: str, seed: int):
        self.s, self.device = shapes, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.results: list[dict] = []

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.gen, device=self.device) * scale
        return x.to(self.s.dtype)

    def poisoned(self, shape) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=self.s.dtype, device=self.device)

    def record(self, name: str, out: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
        _sync(self.device)
        out64, ref64 = out.double(), ref.double()
        finite = bool(torch.isfinite(out64).all())
        diff = (out64 - ref64).nan_to_num(nan=math.inf)
        max_err = float(diff.abs().max()) if diff.numel() else 0.0
        rel = float(diff.norm() / ref64.norm()) if finite else math.inf
        ok = finite and rel <= bound
        self.results.append({"kernel": name, "max_abs_err": max_err, "rel_err": rel,
                             "bound": bound, "pass": ok})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<44} max|err| {max_err:.3e}  "
              f"rel {rel:.3e}  (bound {bound:.0e})", flush=True)

    def paged_cache(self, seq_lens: list[int]):
        """A random cache whose blocks are handed out shuffled, plus spare columns of live
        block ids past each context (must never be read)."""
        bs = self.s.block_size
        width = max(-(-n // bs) for n in seq_lens) + self.s.spare_columns
        num_blocks = width * len(seq_lens)
        cache = self.randn(2, num_blocks, bs, self.s.kv_heads, self.s.head_dim)
        perm = torch.randperm(num_blocks, generator=self.gen, device=self.device)
        tables = perm.view(len(seq_lens), width).to(torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=self.device)
        return cache, tables, lens


def run_checks(c: Checker, under_sanitizer: bool = False) -> None:
    """Each check on its own: one kernel failing to compile or run does not hide the others."""
    checks = [check_kv_cache_write, check_rms_norm, check_rotary_embedding, check_silu_and_mul,
              check_decode, check_prefill, check_backend, check_fp8_kv_cache,
              check_fp8_quant, check_weight_only_gemm]
    if not under_sanitizer:  # cuBLAS is not ours to check; capture needs the caching allocator
        checks.append(check_model)
        if c.device == "cuda":
            checks.append(check_cuda_graph)
    for check in checks:
        try:
            check(c)
        except Exception as exc:  # report it as this kernel's FAIL and go on to the next
            c.results.append({"kernel": check.__name__, "error": f"{type(exc).__name__}: {exc}",
                              "pass": False})
            print(f"FAIL  {check.__name__}: {type(exc).__name__}: {exc}", flush=True)


def _qkv_views(c: Checker, T: int):
    """q, k, v [T, heads, head_dim] as strided views of one fused qkv output (the engine's)."""
    s = c.s
    qkv = c.randn(T, (s.heads + 2 * s.kv_heads) * s.head_dim)
    q, k, v = qkv.split([s.heads * s.head_dim] + [s.kv_heads * s.head_dim] * 2, -1)
    return (q.view(T, s.heads, s.head_dim), k.view(T, s.kv_heads, s.head_dim),
            v.view(T, s.kv_heads, s.head_dim))


def check_kv_cache_write(c: Checker) -> None:
    from pagewire.kernels.kv_cache_write import write_kv_cache, write_kv_cache_reference

    s, T = c.s, c.s.num_tokens
    _, k, v = _qkv_views(c, T)
    num_blocks = 2 * -(-T // s.block_size)
    slots = torch.randperm(num_blocks * s.block_size, generator=c.gen, device=c.device)[:T]
    cache = c.randn(2, num_blocks, s.block_size, s.kv_heads, s.head_dim)
    ours, ref = cache.clone(), cache.clone()
    write_kv_cache(ours, k, v, slots)
    write_kv_cache_reference(ref, k, v, slots)
    c.record("kv_cache_write (exact)", ours, ref, 0.0)


def check_rms_norm(c: Checker) -> None:
    from pagewire.kernels.rms_norm import rms_norm, rms_norm_reference

    s, T = c.s, c.s.num_tokens
    x, residual = c.randn(T, s.hidden), c.randn(T, s.hidden)
    weight = (torch.rand(s.hidden, generator=c.gen, device=c.device) + 0.5).to(s.dtype)
    _poison_allocator(x)
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = rms_norm_reference(x.float(), weight.float(), 1e-5, residual.float())
    c.record("rms_norm + residual: out", out, ref_out, s.bound)
    c.record("rms_norm + residual: residual", new_residual, ref_residual, s.bound)
    q_heads = c.randn(T, s.heads, s.head_dim)
    head_weight = (torch.rand(s.head_dim, generator=c.gen, device=c.device) + 0.5).to(s.dtype)
    _poison_allocator(q_heads)
    c.record("rms_norm per head (qwen3 q/k norm)", rms_norm(q_heads, head_weight, 1e-6),
             rms_norm_reference(q_heads.float(), head_weight.float(), 1e-6), s.bound)


def check_rotary_embedding(c: Checker) -> None:
    from pagewire.kernels.rotary_embedding import rotary_embedding, rotary_embedding_reference
    from pagewire.model.layers import RotaryEmbedding

    s, T = c.s, c.s.num_tokens
    max_pos = 2 * s.decode_max_context
    rope = RotaryEmbedding(s.head_dim, max_pos, 500000.0, LLAMA3_ROPE).to(c.device)
    positions = torch.randint(0, max_pos, (T,), generator=c.gen, device=c.device)
    q, k, _ = _qkv_views(c, T)
    _poison_allocator(q)
    q_out, k_out = rotary_embedding(positions, q, k, rope.cos, rope.sin)
    q_ref, k_ref = rotary_embedding_reference(positions, q.float(), k.float(), rope.cos,
                                              rope.sin)
    c.record("rotary_embedding (llama3 scaling): q", q_out, q_ref, s.bound)
    c.record("rotary_embedding (llama3 scaling): k", k_out, k_ref, s.bound)


def check_silu_and_mul(c: Checker) -> None:
    from pagewire.kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference

    s, T = c.s, c.s.num_tokens
    gate_up = c.randn(T, 2 * s.intermediate, scale=2.0)
    _poison_allocator(gate_up[:, : s.intermediate])
    c.record("silu_and_mul", silu_and_mul(gate_up), silu_and_mul_reference(gate_up.float()),
             s.bound)


def check_fp8_quant(c: Checker) -> None:
    """Per-token fp8 activations (quantization="fp8"): bit-exact with the torch reference on a
    GPU (rel bound 0), scales and values both. Triton's CPU interpreter slips on some fp8
    roundings (tests/kernels/test_fp8_quant.py names them: one lands 128 on 64), so the smoke
    run allows 0.1."""
    from pagewire.kernels.fp8_quant import per_token_fp8, per_token_fp8_reference

    s, T = c.s, c.s.num_tokens
    x = c.randn(T, s.intermediate, scale=3.0)
    values, scales = per_token_fp8(x)
    want_values, want_scales = per_token_fp8_reference(x)
    bound = 0.0 if c.device == "cuda" else 0.1
    c.record("fp8_quant scales", scales, want_scales, 0.0)
    c.record("fp8_quant values", values.float(), want_values.float(), bound)


def check_weight_only_gemm(c: Checker) -> None:
    """W4A16 and W8A16 (GPTQ/AWQ/compressed-tensors/GGUF layers) at decode batch 16 on the
    down projection's shape (K = intermediate, the longest K loop), groups of 128 and 32."""
    from pagewire.kernels.weight_only_gemm import weight_only_gemm, weight_only_gemm_reference
    from pagewire.model.quantization.weight_only import pack_rows

    s = c.s
    k, n = max(256, s.intermediate // 128 * 128), s.hidden
    for bits, group in ((4, 128), (8, 32)):
        q = torch.randint(0, 1 << bits, (k, n), generator=c.gen, device=c.device)
        scales = (torch.rand(k // group, n, generator=c.gen, device=c.device) * 0.01 + 1e-3)
        offsets = c.randn(k // group, n, scale=0.02)
        x = c.randn(16, k)
        qweight, scales = pack_rows(q, bits), scales.to(s.dtype)
        out = weight_only_gemm(x, qweight, scales, offsets, bits, group)
        ref = weight_only_gemm_reference(x.float(), qweight, scales, offsets, bits, group)
        c.record(f"weight_only_gemm W{bits}A16 g{group} (M=16)", out, ref, s.bound)


def check_decode(c: Checker) -> None:
    from pagewire.kernels import paged_decode_attention as mod

    s = c.s
    n = s.decode_max_context
    seq_lens = [1, s.block_size, s.block_size + 1, n - 1][: s.decode_batch - 1]
    seq_lens += torch.randint(1, n + 1, (s.decode_batch - 1 - len(seq_lens),), generator=c.gen,
                              device=c.device).tolist()
    seq_lens.append(n)  # the longest last: its table row ends the table's allocation
    cache, tables, lens = c.paged_cache(seq_lens)
    q = c.randn(s.decode_batch, s.heads, s.head_dim)
    scale = s.head_dim**-0.5
    ref = mod.paged_decode_attention_reference(q.float(), cache.float(), tables, lens, scale)
    configs = [{}, {"num_splits": 1}]
    if s.spare_columns == 0:  # under the sanitizer: every code path of the launcher
        configs += [{"num_splits": 3, "block_n": 32}, {"num_splits": 2, "num_stages": 2},
                    {"num_splits": 16, "block_n": 128, "num_warps": 8}]
    for cfg in configs:
        out = c.poisoned(q.shape)
        mod.paged_decode_attention(q, cache, tables, lens, scale, out=out, **cfg)
        label = ", ".join(f"{k}={v}" for k, v in cfg.items()) or "default config"
        c.record(f"paged_decode_attention ({label}, B={s.decode_batch})", out, ref, s.bound)


def check_prefill(c: Checker) -> None:
    from pagewire.kernels import paged_prefill_attention as mod

    s = c.s
    qlens, prefixes = list(s.prefill_query_lens), list(s.prefill_prefix_lens)
    cache, tables, lens = c.paged_cache([p + q for p, q in zip(prefixes, qlens)])
    starts = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                          device=c.device)
    q = c.randn(sum(qlens), s.heads, s.head_dim)
    scale = s.head_dim**-0.5
    out = c.poisoned(q.shape)
    mod.paged_prefill_attention(q, cache, tables, lens, starts, max(qlens), scale, out=out)
    ref = mod.paged_prefill_attention_reference(q.float(), cache.float(), tables, lens, starts,
                                                scale)
    c.record(f"paged_prefill_attention (chunks {qlens})", out, ref, s.bound)


def check_backend(c: Checker) -> None:
    """One mixed step (decodes, then chunks with and without a cached prefix) through the
    engine's metadata: the Triton backend in the test dtype vs the torch backend in float32."""
    from pagewire.kernels.attention_backend import TritonPagedAttention
    from pagewire.model.attention import TorchPagedAttention, build_attention_metadata

    s, bs = c.s, c.s.block_size
    n = s.decode_max_context // 4
    query_lens = [1] * 8 + [n // 2, n // 3]
    context_lens = torch.randint(1, n, (8,), generator=c.gen, device=c.device).tolist()
    context_lens += [n // 2, n]
    num_blocks = sum(-(-x // bs) for x in context_lens) + 4
    perm = torch.randperm(num_blocks, generator=c.gen, device=c.device).tolist()
    tables = []
    for x in context_lens:
        tables.append(perm[: -(-x // bs)])
        perm = perm[-(-x // bs):]
    meta = build_attention_metadata(query_lens, context_lens, tables, bs, c.device)
    T = sum(query_lens)
    q = c.randn(T, s.heads, s.head_dim)
    k, v = c.randn(T, s.kv_heads, s.head_dim), c.randn(T, s.kv_heads, s.head_dim)
    cache = c.randn(2, num_blocks, bs, s.kv_heads, s.head_dim)
    args = (s.heads, s.kv_heads, s.head_dim, s.head_dim**-0.5)
    ref_cache = cache.float()
    out = TritonPagedAttention(*args).forward(q, k, v, cache, meta)
    with _torch_sdpa_only():
        ref = TorchPagedAttention(*args).forward(q.float(), k.float(), v.float(), ref_cache,
                                                 meta)
    c.record("attention backend vs torch backend (cache)", cache, ref_cache, 0.0)
    c.record(f"attention backend vs torch backend ({T} tokens)", out, ref, s.bound)


def check_fp8_kv_cache(c: Checker) -> None:
    """An fp8 cache (kv_cache_dtype="fp8"): the write rounds and saturates exactly as torch
    does; decode and prefill attention read it exactly as their references do."""
    from pagewire.kernels.kv_cache_write import write_kv_cache, write_kv_cache_reference
    from pagewire.kernels.paged_decode_attention import (
        paged_decode_attention,
        paged_decode_attention_reference,
    )
    from pagewire.kernels.paged_prefill_attention import (
        paged_prefill_attention,
        paged_prefill_attention_reference,
    )

    s, fp8 = c.s, torch.float8_e4m3fn
    T = s.num_tokens
    _, k, v = _qkv_views(c, T)
    k, v = k * 200, v * 200  # rounding everywhere, saturation in the tails
    if c.device == "cpu":
        # Triton's CPU interpreter rounds one binade low on a carry (tests/kernels/
        # test_kv_cache_write.py): values on the fp8 grid check the path, the GPU the rounding.
        k, v = k.to(fp8).to(k.dtype), v.to(fp8).to(v.dtype)
    num_blocks = 2 * -(-T // s.block_size)
    slots = torch.randperm(num_blocks * s.block_size, generator=c.gen, device=c.device)[:T]
    cache = c.randn(2, num_blocks, s.block_size, s.kv_heads, s.head_dim).to(fp8)
    ours, ref = cache.clone(), cache.clone()
    write_kv_cache(ours, k, v, slots)
    write_kv_cache_reference(ref, k, v, slots)
    c.record("fp8 kv_cache_write (exact, saturating)", ours.float(), ref.float(), 0.0)

    lens = torch.randint(1, s.decode_max_context, (s.decode_batch,), generator=c.gen,
                         device=c.device).tolist()
    cache, tables, lens = c.paged_cache(lens)
    cache = cache.to(fp8)
    q = c.randn(s.decode_batch, s.heads, s.head_dim)
    scale = s.head_dim**-0.5
    out = paged_decode_attention(q, cache, tables, lens, scale)
    ref = paged_decode_attention_reference(q.float(), cache, tables, lens, scale)
    c.record(f"fp8 paged_decode_attention (B={s.decode_batch})", out, ref, s.bound)

    qlens, prefixes = list(s.prefill_query_lens), list(s.prefill_prefix_lens)
    cache, tables, lens = c.paged_cache([p + q for p, q in zip(prefixes, qlens)])
    cache = cache.to(fp8)
    starts = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                          device=c.device)
    q = c.randn(sum(qlens), s.heads, s.head_dim)
    out = paged_prefill_attention(q, cache, tables, lens, starts, max(qlens), scale)
    ref = paged_prefill_attention_reference(q.float(), cache, tables, lens, starts, scale)
    c.record(f"fp8 paged_prefill_attention (chunks {qlens})", out, ref, s.bound)


def check_cuda_graph(c: Checker) -> None:
    """The backend launches without a device sync: one decode step captured in a CUDA graph
    and replayed on new queries and new K/V matches the same step run eagerly."""
    from pagewire.kernels.attention_backend import TritonPagedAttention
    from pagewire.model.attention import build_attention_metadata

    s, bs = c.s, c.s.block_size
    lens = torch.randint(1, s.decode_max_context, (s.decode_batch,), generator=c.gen,
                         device=c.device).tolist()
    cache, tables, _ = c.paged_cache(lens)
    meta = build_attention_metadata([1] * len(lens), lens, tables.tolist(), bs, c.device)
    q = c.randn(len(lens), s.heads, s.head_dim)
    k, v = c.randn(len(lens), s.kv_heads, s.head_dim), c.randn(len(lens), s.kv_heads, s.head_dim)
    backend = TritonPagedAttention(s.heads, s.kv_heads, s.head_dim, s.head_dim**-0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(q, k, v, cache.clone(), meta)  # warm-up: compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, meta)
    for t in (q, k, v):
        t.copy_(c.randn(*t.shape))
    eager_cache = cache.clone()
    graph.replay()
    ref = backend.forward(q, k, v, eager_cache, meta)
    c.record("attention backend in a CUDA graph (cache)", cache, eager_cache, 0.0)
    c.record(f"attention backend in a CUDA graph (B={len(lens)})", out, ref, 0.0)


def check_model(c: Checker) -> None:
    """The engine's own Llama forward (2 layers, Llama-3 heads) over two steps (prompts, then
    decodes beside a second chunk on a cached prefix) built with use_triton as the engine
    builds it on CUDA, against the same weights on the torch path. In bf16
    the bound is 1.5x the torch path's own bf16 error (both against the float32 torch path)."""
    from transformers import LlamaConfig

    from pagewire.model.llama import LlamaForCausalLM, ModelSpec
    from pagewire.model.weights import init_dummy_weights

    s = c.s
    config = LlamaConfig(hidden_size=s.heads * s.head_dim, intermediate_size=s.intermediate,
                         num_hidden_layers=2, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, head_dim=s.head_dim, vocab_size=1000,
                         max_position_embeddings=16384,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    spec = ModelSpec.from_hf_config(config)
    with torch.device(c.device):
        reference = LlamaForCausalLM(spec).float()
    init_dummy_weights(reference, c.gen.initial_seed())
    n = s.decode_max_context // 8
    steps = [([n, n // 3, n // 2], [n, n // 3, n // 2]),          # step 1: three prompts
             ([1, 1, n // 4], [n + 1, n // 3 + 1, n // 2 + n // 4])]  # step 2: mixed
    ids = torch.randint(0, 1000, (3, 2 * n), generator=c.gen, device=c.device)
    hidden = {}
    with _torch_sdpa_only():
        for name in ("float32", "torch", "triton"):
            model = reference if name == "float32" else _copy_model(
                reference, spec, s.dtype, use_triton=name == "triton")
            hidden[name] = _run_steps(model, spec, s, steps, ids, c.device)
    err_torch = float((hidden["torch"].double() - hidden["float32"].double()).norm()
                      / hidden["float32"].double().norm())
    bound = s.bound if s.dtype == torch.float32 else 1.5 * err_torch
    dtype = str(s.dtype).removeprefix("torch.")
    c.record(f"llama forward, triton kernels (torch {dtype} err {err_torch:.1e})",
             hidden["triton"].float(), hidden["float32"], bound)


def _copy_model(reference, spec, dtype, use_triton: bool):
    """The reference's weights in a model built as the engine builds it on CUDA
    (LlamaForCausalLM(spec, use_triton)): Triton kernels for attention and the small ops."""
    from pagewire.model.llama import LlamaForCausalLM

    with torch.device(next(reference.parameters()).device):
        model = LlamaForCausalLM(spec, use_triton)
    model.load_state_dict(reference.state_dict())
    return model.to(dtype)


def _run_steps(model, spec, s: Shapes, steps, ids, device) -> torch.Tensor:
    """Runs the steps on a fresh cache; returns every step's final hidden states, stacked."""
    from pagewire.model.attention import build_attention_metadata

    bs = s.block_size
    dtype = next(model.parameters()).dtype
    num_blocks = 3 * (-(-2 * ids.shape[1] // bs))
    caches = [torch.zeros(2, num_blocks, bs, spec.num_kv_heads, spec.head_dim, dtype=dtype,
                          device=device) for _ in range(spec.num_layers)]
    tables = [list(range(i, num_blocks, 3)) for i in range(3)]  # interleaved, not contiguous
    outs = []
    for query_lens, context_lens in steps:
        token_ids, positions = [], []
        for seq, (qlen, clen) in enumerate(zip(query_lens, context_lens)):
            token_ids += ids[seq, clen - qlen:clen].tolist()
            positions += list(range(clen - qlen, clen))
        meta = build_attention_metadata(query_lens, context_lens,
                                        [t[: -(-c // bs)] for t, c in zip(tables, context_lens)],
                                        bs, device)
        outs.append(model(torch.tensor(token_ids, device=device),
                          torch.tensor(positions, device=device), caches, meta).float())
    return torch.cat(outs)


@contextlib.contextmanager
def _torch_sdpa_only():
    """The torch backend's SDPA path, never the native C++ CPU kernel (no compiler run)."""
    import pagewire.model.attention as engine_attention

    native_ok = engine_attention._native_ok
    engine_attention._native_ok = lambda q, kv_cache: False
    try:
        yield
    finally:
        engine_attention._native_ok = native_ok


def _poison_allocator(like: torch.Tensor) -> None:
    """Leaves a NaN-filled free block of like's size in the caching allocator, so that a
    kernel's freshly allocated output starts poisoned rather than zero or stale-correct."""
    if like.is_cuda:
        torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # surfaces any launch error here, at the kernel that made it


# ---------------------------------------------------------------- timing


def graph_time(fn) -> float:
    """Seconds per call: median over CUDA-graph replays of back-to-back calls."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e-3


def event_time(fn) -> float:
    """Seconds per call: median of event-timed calls, L2 flushed before each."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / event_time(lambda: dst.copy_(src))


def time_decode(s: Shapes, batch: int, context: int, copy_bw: float, sweep: bool,
                trace, fp8_sweep: bool = False) -> dict:
    import torch.nn.functional as F

    from pagewire.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention

    B, H, KVH, D, bs = batch, s.heads, s.kv_heads, s.head_dim, s.block_size
    gen = torch.Generator(device="cuda").manual_seed(context)
    num_blocks = B * context // bs
    cache = torch.randn(2, num_blocks, bs, KVH, D, generator=gen, device="cuda").to(s.dtype)
    tables = torch.randperm(num_blocks, generator=gen, device="cuda").view(B, -1).int()
    lens = torch.full((B,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, generator=gen, device="cuda").to(s.dtype)
    out = torch.empty_like(q)
    scale = D**-0.5
    elem = q.element_size()
    useful_bytes = 2 * B * context * KVH * D * elem + 2 * B * H * D * elem

    def run(**cfg):
        return lambda: paged_decode_attention(q, cache, tables, lens, scale, out=out,
                                              max_seq_len=context, **cfg)

    default_splits = choose_num_splits(B * KVH, context, q.device)
    row = {"context": context, "batch": B, "useful_bytes": useful_bytes,
           "default_num_splits": default_splits}
    trace(f"context {context}: default config ({default_splits} splits)")
    t = graph_time(run())
    row.update(triton_s=t, triton_event_s=event_time(run()), triton_bw=useful_bytes / t,
               triton_frac=useful_bytes / t / copy_bw)
    # The same step over an fp8 copy of the cache: half the bytes, so maybe wider tiles.
    cache8 = cache.to(torch.float8_e4m3fn)
    fp8_bytes = B * context * KVH * D * 2 + 2 * B * H * D * elem
    fp8_rows = []
    configs = [{}, {"block_n": 64}, {"fp8_f16_dots": False}]
    if fp8_sweep:
        configs += [{"block_n": bn, "num_warps": w, "num_stages": st}
                    for bn in (128, 256) for w in (2, 4, 8) for st in (2, 3, 4)]
    for cfg in configs:
        trace(f"context {context}: fp8 cache {cfg}")
        t8 = graph_time(lambda cfg=cfg: paged_decode_attention(
            q, cache8, tables, lens, scale, out=out, max_seq_len=context, **cfg))
        fp8_rows.append({**cfg, "seconds": t8, "frac": fp8_bytes / t8 / copy_bw})
    t8 = fp8_rows[0]["seconds"]  # the default config (before sorting)
    row.update(fp8_s=t8, fp8_frac=fp8_bytes / t8 / copy_bw, fp8_speedup=t / t8,
               fp8_configs=fp8_rows)
    fp8_rows.sort(key=lambda r: r["seconds"])
    print(f"  fp8 B={B} ctx={context} (fastest first): " + "; ".join(
        f"{ {k: v for k, v in r.items() if k not in ('seconds', 'frac')} } "
        f"{r['seconds'] * 1e6:.1f} us {r['frac']:.0%}" for r in fp8_rows[:5]), flush=True)
    configs = []
    for cfg in _decode_sweep(batch == s.decode_batch) if sweep else []:
        trace(f"context {context}: {cfg}")
        try:
            ct = graph_time(run(**cfg))
        except Exception as exc:  # e.g. out of shared memory: record, go on
            configs.append({**cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        configs.append({**cfg, "seconds": ct, "frac": useful_bytes / ct / copy_bw})
    timed = [x for x in configs if "seconds" in x]
    if timed:
        row["best"] = min(timed, key=lambda x: x["seconds"])
    row["sweep"] = configs

    # torch SDPA on K/V gathered into contiguous [B, KVH, context, D] (gather not timed)
    k = cache[0][tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v = cache[1][tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    qs = q.unsqueeze(2)  # [B, H, 1, D]
    trace(f"context {context}: torch SDPA")
    sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale,  # noqa: E731
                                                  enable_gqa=True)
    ts = graph_time(sdpa)
    row.update(sdpa_s=ts, sdpa_bw=useful_bytes / ts, sdpa_frac=useful_bytes / ts / copy_bw)
    ref = sdpa().squeeze(2).float()
    got = paged_decode_attention(q, cache, tables, lens, scale).float()
    row["triton_vs_sdpa_rel"] = float((got - ref).norm() / ref.norm())
    return row


def _decode_sweep(full: bool) -> list[dict]:
    """Launch configurations timed beside the default: all shapes at batch 64, only the
    split count at the small batch."""
    if not full:
        return [dict(block_n=64, num_warps=4, num_stages=3, num_splits=n)
                for n in (1, 2, 4, 8, 16, 32)]
    return [dict(block_n=bn, num_warps=w, num_stages=st, num_splits=n)
            for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3) for n in (1, 2, 4, 8)]


def time_others(s: Shapes, copy_bw: float, trace) -> list[dict]:
    """One timing per remaining kernel at T tokens, as achieved bandwidth (or FLOP/s)."""
    import torch.nn.functional as F

    from pagewire.kernels.kv_cache_write import write_kv_cache
    from pagewire.kernels.paged_prefill_attention import paged_prefill_attention
    from pagewire.kernels.rms_norm import rms_norm
    from pagewire.kernels.rotary_embedding import rotary_embedding
    from pagewire.kernels.silu_and_mul import silu_and_mul
    from pagewire.model.layers import RotaryEmbedding

    T, dt, e = s.num_tokens, s.dtype, 2
    r = lambda *shape: torch.randn(*shape, device="cuda").to(dt)  # noqa: E731
    rows = []

    def add(name, fn, nbytes=None, flops=None):
        trace(name)
        try:
            t = event_time(fn)
        except Exception as exc:  # keep the other kernels' numbers
            rows.append({"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        row = {"kernel": name, "seconds": t}
        if nbytes:
            row.update(bw=nbytes / t, frac=nbytes / t / copy_bw)
        if flops:
            row.update(tflops=flops / t / 1e12)
        rows.append(row)

    x, res, w = r(T, s.hidden), r(T, s.hidden), r(s.hidden)
    add(f"rms_norm+residual T={T}", lambda: rms_norm(x, w, 1e-5, res), 4 * T * s.hidden * e)
    gu = r(T, 2 * s.intermediate)
    add(f"silu_and_mul T={T}", lambda: silu_and_mul(gu), 3 * T * s.intermediate * e)
    rope = RotaryEmbedding(s.head_dim, 16384, 500000.0, LLAMA3_ROPE).to("cuda")
    q, k = r(T, s.heads, s.head_dim), r(T, s.kv_heads, s.head_dim)
    pos = torch.randint(0, 16384, (T,), device="cuda")
    add(f"rotary_embedding T={T}", lambda: rotary_embedding(pos, q, k, rope.cos, rope.sin),
        2 * (q.numel() + k.numel()) * e)
    num_blocks = 4 * T // s.block_size
    cache = r(2, num_blocks, s.block_size, s.kv_heads, s.head_dim)
    slots = torch.randperm(num_blocks * s.block_size, device="cuda")[:T]
    v = r(T, s.kv_heads, s.head_dim)
    add(f"kv_cache_write T={T}", lambda: write_kv_cache(cache, k, v, slots), 4 * k.numel() * e)

    # prefill: 4 fresh 2048-token prompts, beside SDPA's causal flash path on contiguous K/V
    P, n = 4, 2048
    bs = s.block_size
    cache = r(2, P * n // bs, bs, s.kv_heads, s.head_dim)
    tables = torch.randperm(P * n // bs, device="cuda").view(P, -1).int()
    lens = torch.full((P,), n, dtype=torch.int32, device="cuda")
    starts = torch.arange(0, (P + 1) * n, n, dtype=torch.int32, device="cuda")
    qp = r(P * n, s.heads, s.head_dim)
    flops = 4 * P * s.heads * s.head_dim * n * (n + 1) / 2
    scale = s.head_dim**-0.5
    add(f"paged_prefill_attention {P}x{n} causal",
        lambda: paged_prefill_attention(qp, cache, tables, lens, starts, n, scale),
        flops=flops)
    sweep = []
    for cfg in [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]:
        trace(f"prefill {cfg}")
        try:
            t = event_time(lambda cfg=cfg: paged_prefill_attention(
                qp, cache, tables, lens, starts, n, scale, **cfg))
        except Exception as exc:  # e.g. out of shared memory: record, go on
            sweep.append({**cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        sweep.append({**cfg, "seconds": t, "tflops": flops / t / 1e12})
    timed = [x for x in sweep if "seconds" in x]
    if timed:
        best = min(timed, key=lambda x: x["seconds"])
        label = ",".join(str(best[k]) for k in ("block_m", "block_n", "num_warps", "num_stages"))
        rows.append({"kernel": f"  best of sweep (bm,bn,w,st = {label})", "sweep": sweep,
                     **{k: best[k] for k in ("seconds", "tflops")}})
    kk = cache[0][tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    vv = cache[1][tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    qq = qp.view(P, n, s.heads, s.head_dim).transpose(1, 2).contiguous()
    add(f"torch SDPA causal {P}x{n} (contiguous)",
        lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                               enable_gqa=True), flops=flops)
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny float32 shapes, checks only (CPU: Triton's interpreter)")
    parser.add_argument("--sanitize", action="store_true",
                        help="checks only, at shapes small enough for compute-sanitizer")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="time the default config only")
    parser.add_argument("--fp8-sweep", action="store_true",
                        help="time tile, warp and stage choices of the fp8-cache decode")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DECODE_CONTEXTS))
    parser.add_argument("--trace", action="store_true", help="print each timing step first")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                        help="fresh inputs every run by default; printed for replay")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # decode:BATCH:CONTEXT, others
    parser.add_argument("--copy-bw", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            parser.error("no CUDA device: run with --smoke (Triton's interpreter, tiny shapes)")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    if "pagewire" not in sys.modules:
        _load_pagewire()
    if args.child:
        return run_child(args)
    import triton

    shapes = SMOKE if args.smoke else SANITIZE if args.sanitize else LLAMA3_8B
    device = "cuda" if cuda else "cpu"
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}, "
          f"torch {torch.__version__}, triton {triton.__version__}, seed {args.seed}",
          flush=True)
    report: dict = {"seed": args.seed, "torch": torch.__version__, "triton": triton.__version__,
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "checks": []}
    if not args.skip_checks:
        checker = Checker(shapes, device, args.seed)
        with torch.inference_mode():
            run_checks(checker, under_sanitizer=args.sanitize)
        report["checks"] = checker.results
    if cuda and not (args.smoke or args.sanitize or args.skip_timing):
        report.update(time_all(args))
    _write_report(report)
    print_summary(report)
    return 0 if all(r["pass"] for r in report["checks"]) else 1


CHILD_ROW = "CHILD_ROW "


def run_child(args) -> int:
    """One timing section in its own process: a kernel that faults (an illegal address
    poisons the whole CUDA context) costs that section's numbers only."""
    trace = (lambda msg: print(f"  .. {msg}", flush=True)) if args.trace else (lambda msg: None)
    with torch.inference_mode():
        if args.child == "others":
            row = {"others": time_others(LLAMA3_8B, args.copy_bw, trace)}
        else:
            _, batch, context = args.child.split(":")
            row = time_decode(LLAMA3_8B, int(batch), int(context), args.copy_bw,
                              not args.no_sweep, trace, args.fp8_sweep)
    torch.cuda.synchronize()
    print(CHILD_ROW + json.dumps(row), flush=True)
    return 0


def _child(args, name: str, copy_bw: float) -> dict:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
           "--copy-bw", str(copy_bw), "--seed", str(args.seed)]
    cmd += ["--no-sweep"] * args.no_sweep + ["--trace"] * args.trace
    cmd += ["--fp8-sweep"] * args.fp8_sweep
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_ROW)]
    for line in proc.stdout.splitlines():
        if not line.startswith(CHILD_ROW):
            print(line, flush=True)
    if proc.returncode != 0 or not rows:
        tail = proc.stderr.strip().splitlines()[-12:]
        print(f"{name}: exit {proc.returncode}\n  " + "\n  ".join(tail), flush=True)
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail[-3:])}
    return json.loads(rows[-1][len(CHILD_ROW):])


def time_all(args) -> dict:
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    decode = []
    runs = [(LLAMA3_8B.decode_batch, c) for c in args.contexts]
    runs.append((SMALL_BATCH, max(args.contexts)))
    runs.append((512, 1024))  # W1's decode steps: 512 sequences, contexts up to 1280
    for batch, context in runs:
        row = _child(args, f"decode:{batch}:{context}", copy_bw)
        decode.append({"batch": batch, "context": context, **row})
        print(f"decode batch {batch} context {context}: {row.get('error', 'done')}",
              flush=True)
    others = _child(args, "others", copy_bw)
    return {"copy_bw": copy_bw, "decode": decode,
            "others": others.get("others", [{"kernel": "others", **others}])}


def print_summary(report: dict) -> None:
    checks = report["checks"]
    failed = [r["kernel"] for r in checks if not r["pass"]]
    if "decode" in report:
        print("\nother kernels (events, L2 flushed, median):")
        for row in report["others"]:
            if "error" in row:
                print(f"  {row['kernel']:<44} ERROR {row['error']}")
                continue
            extra = (f"{row['bw'] / 1e9:8.0f} GB/s {row['frac']:6.1%} of copy" if "bw" in row
                     else f"{row['tflops']:8.1f} TFLOP/s")
            print(f"  {row['kernel']:<44}{row['seconds'] * 1e6:9.1f} us  {extra}")
        print(f"\npaged decode attention, Llama-3-8B heads (32 q / 8 kv x 128), bf16, "
              f"block 16; copy bandwidth {report['copy_bw'] / 1e12:.2f} TB/s; "
              "SDPA on pre-gathered contiguous K/V (gather not timed)")
        print(f"{'B':>3} {'ctx':>5} {'splits':>6} {'triton us':>10} {'TB/s':>6} {'%copy':>6} "
              f"{'best us':>8} {'%copy':>6} {'best cfg (bn,w,st,sp)':>22} "
              f"{'SDPA us':>8} {'%copy':>6} {'fp8 us':>8} {'%copy':>6} {'x bf16':>6}")
        for row in report["decode"]:
            if "error" in row:
                print(f"{row['batch']:>3} {row['context']:>5} ERROR {row['error'][:200]}")
                continue
            best = row.get("best", {})
            cfg = (f"{best['block_n']},{best['num_warps']},{best['num_stages']},"
                   f"{best['num_splits']}") if best else "-"
            print(f"{row['batch']:>3} {row['context']:>5} {row['default_num_splits']:>6} "
                  f"{row['triton_s'] * 1e6:>10.1f} {row['triton_bw'] / 1e12:>6.2f} "
                  f"{row['triton_frac']:>6.1%} "
                  f"{best.get('seconds', math.nan) * 1e6:>8.1f} {best.get('frac', math.nan):>6.1%}"
                  f" {cfg:>22} {row['sdpa_s'] * 1e6:>8.1f} {row['sdpa_frac']:>6.1%}"
                  f" {row['fp8_s'] * 1e6:>8.1f} {row['fp8_frac']:>6.1%}"
                  f" {row['fp8_speedup']:>6.2f}")
    print(f"\nchecks: {len(checks) - len(failed)}/{len(checks)} PASS"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))


def _write_report(report: dict) -> None:
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "gpu_kernels_check.json"
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
