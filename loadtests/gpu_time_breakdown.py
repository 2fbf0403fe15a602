"""On CUDA: where W1's GPU time goes, kernel by kernel, and how long the GPU sits idle.

Runs W1 (or --num-prompts of it) once to warm up, then once under torch.profiler with only
device activity recorded (the host side is profile_engine.py's job). Kernels are grouped by
what they do: GEMMs, attention, the small fused ops, sampling and logits, copies. GPU busy
time against wall time says how much of the run the host still leaves the GPU waiting.

    python loadtests/gpu_time_breakdown.py --model loadtests/configs/llama3-8b [--quantization fp8]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from offline_throughput import make_prompts
from torch.profiler import ProfilerActivity, profile

# (group, substrings of kernel names), first match wins; names are lower-cased.
GROUPS = [
    ("attention (decode)", ("_decode_split_kernel", "_decode_reduce_kernel")),
    ("attention (prefill)", ("_prefill_kernel",)),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("RMSNorm, rotary, SiLU, KV write", ("_rms_norm", "_rotary", "_silu", "_kv_cache_write")),
    ("activation quantization", ("_per_token_fp8", "_fp8_quant")),
    ("sampling and logits", ("argmax", "softmax", "topk", "sort", "exponential", "log_softmax",
                             "reduce_kernel", "gather")),
    ("copies and indexing", ("memcpy", "memset", "copy", "index", "scatter", "cat", "fill")),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(key in lowered for key in keys):
            return group
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="loadtests/configs/llama3-8b")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    parser.add_argument("--quantization", default=None, help="fp8: weights quantized at load")
    args = parser.parse_args()

    from pagewire import LLM, SamplingParams

    llm = LLM(model=args.model, load_format="dummy", device="cuda", max_model_len=4096,
              kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
              show_progress=False)
    prompts = make_prompts(args.num_prompts, 128, 1024, llm.engine.runner.spec.vocab_size, 0)
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(requests, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                 use_tqdm=False)  # warm-up: compiles, captures
    llm.reset_prefix_cache()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    by_group: dict[str, float] = {}
    kernels: list[tuple[float, str]] = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = event.self_cuda_time_total
        if us <= 0:
            continue
        by_group[group_of(event.key)] = by_group.get(group_of(event.key), 0.0) + us / 1e6
        kernels.append((us / 1e6, event.key))
    busy = sum(by_group.values())
    tokens = args.num_prompts * args.new_tokens
    print(f"{tokens / wall:.0f} output tok/s under the profiler; wall {wall:.2f} s, GPU busy "
          f"{busy:.2f} s ({busy / wall:.0%}), idle {wall - busy:.2f} s")
    print(f"{'group':<34}{'GPU s':>8}{'share':>8}")
    for group, seconds in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"{group:<34}{seconds:8.2f}{seconds / busy:8.1%}")
    print("--- top kernels")
    for seconds, name in sorted(kernels, reverse=True)[:args.top]:
        print(f"{seconds:8.2f} s  {group_of(name):<22} {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
