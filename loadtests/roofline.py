"""The fastest an offline workload could run on this device: its roofline floor.

Issue 4's definition: prefill is bound by arithmetic (the prompt tokens' FLOPs at the device's
measured bf16 matmul rate), decode by memory (every step reads all weights once, and every
decoded token reads its sequence's KV, at the measured copy bandwidth). The floor is their sum;
`fraction = floor / measured time` says how close a run came. Measured here, not quoted from a
datasheet, so the same script judges an H100 and an H200 fairly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceLimits:
    matmul_flops_per_s: float  # dense bf16 GEMM, large square
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written

    @classmethod
    def measure(cls, device: str = "cuda") -> DeviceLimits:
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        flops = 2 * n ** 3 / _seconds(lambda: a @ b)
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy = 2 * src.numel() / _seconds(lambda: dst.copy_(src))
        return cls(flops, copy)


def _seconds(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def floor_seconds(spec, prompt_lens: list[int], new_tokens: int, max_num_seqs: int,
                  dtype_bytes: int, limits: DeviceLimits,
                  kv_dtype_bytes: int | None = None) -> dict[str, float]:
    """Prefill and decode floors of `prompt_lens` prompts with `new_tokens` outputs each;
    kv_dtype_bytes: the KV cache's element size when it differs from the weights' (fp8)."""
    h, layers = spec.hidden_size, spec.num_layers
    q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * spec.intermediate_size
    matmul_params = layers * per_layer + h * spec.vocab_size  # + the vocabulary projection
    # Causal attention: QK^T and PV over half the square, per layer.
    attention_flops = sum(2 * 2 * n * n / 2 * q_dim * layers for n in prompt_lens)
    prefill_flops = 2 * (matmul_params - h * spec.vocab_size) * sum(prompt_lens) + \
        2 * h * spec.vocab_size * len(prompt_lens) + attention_flops
    kv_bytes_per_token = 2 * layers * kv_dim * (kv_dtype_bytes or dtype_bytes)
    decode_tokens = len(prompt_lens) * (new_tokens - 1)  # the first comes from prefill
    steps = -(-decode_tokens // min(max_num_seqs, len(prompt_lens)))
    weight_bytes = matmul_params * dtype_bytes  # the embedding lookup reads a few rows only
    kv_read = sum(kv_bytes_per_token * (n + i) for n in prompt_lens for i in range(1, new_tokens))
    # Reads and writes share the memory bus: a read-only stream moves bytes at the copy's
    # (read + written) rate.
    prefill = prefill_flops / limits.matmul_flops_per_s
    decode = (steps * weight_bytes + kv_read) / limits.copy_bytes_per_s
    return {"prefill_s": prefill, "decode_s": decode, "floor_s": prefill + decode}
