"""fp8 GEMMs against bf16 at W1's shapes, on one GPU: where `quantization="fp8"` loses to its 2x.

For each Llama-3-8B projection (qkv, o, gate_up, down) and token count M (decode batches of
256 and 512 sequences, a 16,384-token prefill step): bf16 `F.linear` against `torch._scaled_mm`
on the same weights in e4m3 with row-wise scales (per token x per output channel: what
pagewire's Fp8Linear runs) and with one scale per tensor (vLLM's online fp8 default; the
cuBLASLt path), each with and without the per-token activation quantization kernel in front.
Timed as CUDA-graph replays over enough copies of the layer (>= 256 MB) that none is read
from L2, median of 10 (gpu_weight_only.graph_time). Per shape and summed over a decode step's
32 layers. Writes $OUT/gpu_fp8_gemm.json.

    python loadtests/gpu_fp8_gemm.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_kernels_check import _load_pagewire  # this script's folder is on sys.path
from gpu_weight_only import LAYERS, SHAPES, graph_time

TOKENS = (256, 512, 16384)
FP8 = torch.float8_e4m3fn


def copies_for(nbytes: int) -> int:
    return max(1, -(-(256 << 20) // nbytes))


def time_calls(make_call, weight_bytes: int) -> float:
    calls = [make_call(i) for i in range(copies_for(weight_bytes))]
    return graph_time(calls, "cuda")


def time_layer(x: torch.Tensor, weights: list[torch.Tensor]) -> dict[str, float]:
    """Seconds per call of each variant on x [M, K] and copies of one weight [N, K]."""
    from pagewire.kernels.fp8_quant import per_token_fp8

    n, k = weights[0].shape
    fp8 = [w.to(FP8) for w in weights]
    w_scale = torch.rand(1, n, device="cuda") + 0.5
    one = torch.ones((), device="cuda")
    x_q, x_scale = per_token_fp8(x)

    def rowwise(i):
        return lambda: torch._scaled_mm(x_q, fp8[i].t(), scale_a=x_scale, scale_b=w_scale,
                                        out_dtype=torch.bfloat16)

    def quantize_then_rowwise(i):
        def call():
            q, scale = per_token_fp8(x)
            return torch._scaled_mm(q, fp8[i].t(), scale_a=scale, scale_b=w_scale,
                                    out_dtype=torch.bfloat16)
        return call

    def tensorwise(i):
        return lambda: torch._scaled_mm(x_q, fp8[i].t(), scale_a=one, scale_b=one,
                                        out_dtype=torch.bfloat16)

    row = {"bf16_s": time_calls(lambda i: lambda: F.linear(x, weights[i]), 2 * n * k),
           "rowwise_s": time_calls(rowwise, n * k),
           "rowwise_quant_s": time_calls(quantize_then_rowwise, n * k),
           "tensorwise_s": time_calls(tensorwise, n * k),
           "quant_s": time_calls(lambda i: lambda: per_token_fp8(x), n * k)}
    for key in ("rowwise_s", "rowwise_quant_s", "tensorwise_s"):
        row[key.replace("_s", "_speedup")] = row["bf16_s"] / row[key]
    return row


def main() -> int:
    _load_pagewire()
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "rows": []}
    for name, (k, n) in SHAPES.items():
        weights = [torch.randn(n, k, generator=gen, device="cuda").to(torch.bfloat16) * 0.02
                   for _ in range(copies_for(n * k))]
        for m in TOKENS:
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            row = {"layer": name, "m": m, "k": k, "n": n, **time_layer(x, weights)}
            report["rows"].append(row)
            print(json.dumps({key: round(v, 7) if isinstance(v, float) else v
                              for key, v in row.items()}), flush=True)
    for m in TOKENS:
        rows = [r for r in report["rows"] if r["m"] == m]
        sums = {key: LAYERS * sum(r[key] for r in rows) * 1e3
                for key in ("bf16_s", "rowwise_s", "rowwise_quant_s", "tensorwise_s", "quant_s")}
        print(f"M={m:>5}: 32 layers' GEMMs bf16 {sums['bf16_s']:.2f} ms | fp8 row-wise "
              f"{sums['rowwise_s']:.2f} ms ({sums['bf16_s'] / sums['rowwise_s']:.2f}x), with "
              f"the activation quantization {sums['rowwise_quant_s']:.2f} ms "
              f"({sums['bf16_s'] / sums['rowwise_quant_s']:.2f}x) | tensor-wise "
              f"{sums['tensorwise_s']:.2f} ms ({sums['bf16_s'] / sums['tensorwise_s']:.2f}x) | "
              f"quantization alone {sums['quant_s']:.2f} ms", flush=True)
        report.setdefault("per_step", []).append({"m": m, **sums})
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_fp8_gemm.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
