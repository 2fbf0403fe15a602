"""The W4A16 GEMM against bf16 at decode batch sizes, layer by layer, on one GPU.

For each projection of Llama-3-8B (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096) and batch M in 1, 2, 4, 8, 16: bf16 `F.linear` (cuBLAS) against
kernels/weight_only_gemm.py on the same weights quantized to 4 bits in groups of 128, checked
against the float32 reference first (||out - ref|| / ||ref|| < 1e-2), then timed: CUDA-graph
replays of calls over enough copies of the layer (>= 256 MB) that none is read from L2, median
of 10. A sweep of tiles and split-K picks the best launch per shape beside the default. Per
token, the 32 layers' four projections summed: the decode step's GEMM time, bf16 against
W4A16. Writes $OUT/gpu_weight_only.json.

--cpu times the CPU paths instead, on the embedded SmolLM2-135M's projections (4 bits, groups
of 32 as its Q4_1): the engine's float32 layer (oneDNN-prepacked at these batch sizes), the C++
kernel (model/csrc/weight_only_gemm.cpp) and dequantize-then-multiply, each over rounds of
calls on >= 256 MB of distinct copies (from memory, as in the engine), median of 5 rounds.

    python loadtests/gpu_weight_only.py            # on the GPU, from the repo root
    python loadtests/gpu_weight_only.py --cpu      # the CPU kernel against float32
    python loadtests/gpu_weight_only.py --smoke    # CPU, interpreter, tiny shapes: checks only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from gpu_kernels_check import _load_pagewire  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
SMOKE_SHAPES = {"qkv": (256, 96), "down": (512, 64)}
SMOLLM2_SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072),
                  "down": (1536, 576)}
BATCHES = (1, 2, 4, 8, 16)
LAYERS = 32


def graph_time(calls, device) -> float:
    """Seconds per call: one CUDA graph of all `calls` back to back, median of 10 replays."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm up outside the capture
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_time([lambda: b.copy_(a)], device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    _load_pagewire()
    if args.cpu:
        return cpu_main()
    from pagewire.kernels.weight_only_gemm import weight_only_gemm, weight_only_gemm_reference
    from pagewire.model.quantization.weight_only import pack_rows

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    gen = torch.Generator(device=device).manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "layers": []}
    if device == "cuda":
        report["copy_gb_per_s"] = copy_bandwidth(device) / 1e9
        print(f"copy bandwidth {report['copy_gb_per_s']:.0f} GB/s", flush=True)
    failures = 0
    for name, (k, n) in shapes.items():
        group = 128
        q = torch.randint(0, 16, (k, n), generator=gen, device=device)
        qweight = pack_rows(q, 4)
        scales = (torch.rand(k // group, n, generator=gen, device=device) * 2e-3 + 1e-3
                  ).to(dtype)
        offsets = (scales.float() * -7.5).to(dtype)
        dense = torch.randn(n, k, generator=gen, device=device).to(dtype) * 0.02
        for m in BATCHES:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            out = weight_only_gemm(x, qweight, scales, offsets, 4, group)
            ref = weight_only_gemm_reference(x.float(), qweight, scales, offsets, 4, group)
            rel = float((out.double() - ref.double()).norm() / ref.double().norm())
            ok = rel < (1e-2 if dtype == torch.bfloat16 else 1e-5)
            failures += not ok
            row = {"layer": name, "k": k, "n": n, "m": m, "rel_err": rel, "pass": ok}
            if device == "cuda":
                row.update(_time(weight_only_gemm, x, qweight, scales, offsets, dense, group,
                                 not args.no_sweep, report["copy_gb_per_s"] * 1e9))
                torch.cuda.empty_cache()  # the copies timed over
            report["layers"].append(row)
            print(json.dumps(row), flush=True)
    if device == "cuda":
        for m in BATCHES:
            rows = [r for r in report["layers"] if r["m"] == m]
            bf16 = LAYERS * sum(r["bf16_s"] for r in rows)
            w4 = LAYERS * sum(r["w4a16_s"] for r in rows)
            best = LAYERS * sum(r["w4a16_best_s"] for r in rows)
            report.setdefault("per_token", []).append(
                {"m": m, "bf16_ms": bf16 * 1e3, "w4a16_ms": w4 * 1e3, "speedup": bf16 / w4,
                 "w4a16_best_ms": best * 1e3, "best_speedup": bf16 / best})
            print(f"M={m:>2}: 32 layers' GEMMs bf16 {bf16 * 1e3:.3f} ms, W4A16 "
                  f"{w4 * 1e3:.3f} ms ({bf16 / w4:.2f}x; best launches {bf16 / best:.2f}x)",
                  flush=True)
    print(f"checks: {'all pass' if not failures else f'{failures} FAILED'}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_weight_only.json").write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


def cpu_main() -> int:
    """The CPU paths at the embedded model's shapes; prints a table, writes the JSON."""
    import time

    from pagewire.model.layers import Linear
    from pagewire.model.quantization.weight_only import WeightOnlyLinear

    def median_us(calls) -> float:
        """Per call, over a round of calls on distinct copies of the layer (>= 256 MB in
        all), as the engine streams its layers from memory, not from cache."""
        for call in calls[:3]:
            call()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for call in calls:
                call()
            times.append((time.perf_counter() - start) / len(calls))
        return statistics.median(times) * 1e6

    rows, layers = [], 30
    for name, (k, n) in SMOLLM2_SHAPES.items():
        packed = []
        for i in range(max(1, (256 << 20) // (k * n // 2))):
            layer = WeightOnlyLinear(k, n, 4, 32, torch.float16)
            layer.init_dummy(torch.Generator().manual_seed(k + n + i))
            packed.append(layer)
        dense = []
        for i in range(max(1, (256 << 20) // (k * n * 4))):
            layer = Linear(k, n, bias=False)
            layer.weight.data = packed[i].reference_weight()
            layer.pack_for_cpu()
            dense.append(layer)
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k)
            with torch.inference_mode():
                row = {"layer": name, "k": k, "n": n, "m": m,
                       "float32_us": median_us([lambda d=d, x=x: d(x) for d in dense]),
                       "kernel_us": median_us([lambda p=p, x=x: p(x) for p in packed])
                       if m <= 16 else None,
                       "dequantize_us": median_us(
                           [lambda p=p, x=x: x @ p.dequantized_weight().t() for p in packed[:8]])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for m in (1, 4, 16):
        sel = [r for r in rows if r["m"] == m]
        f32 = layers * sum(r["float32_us"] for r in sel) / 1e3
        kernel = layers * sum(r["kernel_us"] for r in sel) / 1e3
        deq = layers * sum(r["dequantize_us"] for r in sel) / 1e3
        print(f"M={m:>2}: 30 layers' projections float32 {f32:.2f} ms, C++ kernel "
              f"{kernel:.2f} ms ({f32 / kernel:.2f}x), dequantize-then-multiply {deq:.2f} ms")
    out = os.environ.get("OUT")
    if out:
        Path(out, "cpu_weight_only.json").write_text(json.dumps(rows, indent=2))
    return 0


def _time(gemm, x, qweight, scales, offsets, dense, group, sweep, copy_bw) -> dict:
    import torch.nn.functional as F

    k, n = dense.shape[1], dense.shape[0]
    w4_bytes = qweight.numel() * 4 + 2 * scales.numel() * scales.element_size()
    bf16_bytes = dense.numel() * dense.element_size()
    copies = max(1, -(-(256 << 20) // w4_bytes))
    w4_set = [(qweight.clone(), scales.clone(), offsets.clone()) for _ in range(copies)]
    dense_set = [dense.clone() for _ in range(max(1, -(-(256 << 20) // bf16_bytes)))]
    t_bf16 = graph_time([lambda w=w: F.linear(x, w) for w in dense_set], x.device)

    def w4_time(**launch):
        return graph_time([lambda w=w: gemm(x, *w, 4, group, **launch) for w in w4_set],
                          x.device)

    t_w4 = w4_time()
    row = {"bf16_s": t_bf16, "w4a16_s": t_w4, "speedup": t_bf16 / t_w4,
           "bf16_frac": bf16_bytes / t_bf16 / copy_bw, "w4a16_frac": w4_bytes / t_w4 / copy_bw}
    best, best_launch = t_w4, {}
    if sweep:
        from pagewire.kernels.weight_only_gemm import _num_sms, choose_split_k

        for block_n in (32, 64, 128):
            for block_k in (128, 256):  # 16 packed words a step at least (tl.dot)
                auto = choose_split_k(-(-n // block_n), k // block_k, _num_sms(x.device))
                for split_k in sorted({max(1, auto // 2), auto, auto * 2}):
                    for num_warps in (4, 8):
                        launch = {"block_n": block_n, "block_k": block_k, "split_k": split_k,
                                  "num_warps": num_warps}
                        t = w4_time(**launch)
                        if t < best:
                            best, best_launch = t, launch
    row.update(w4a16_best_s=best, best_launch=best_launch, best_frac=w4_bytes / best / copy_bw)
    return row


if __name__ == "__main__":
    sys.exit(main())
