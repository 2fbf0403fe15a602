"""Offline throughput: the pagewire engine against Hugging Face transformers `generate`.

Workload (issue 2): N prompts of random token ids with lengths uniform in [min_len, max_len]
(seeded), `new_tokens` new tokens each with EOS ignored, greedy. transformers runs padded
static batches of `hf_batch` (left padding, KV cache); pagewire gets every prompt at once and
batches continuously. The two alternate `rounds` times in one process, on the same weights,
and the table reports the median of each and their ratio.

    python loadtests/offline_throughput.py                       # embedded model, CPU, float32
    python loadtests/offline_throughput.py --model DIR --load-format dummy --dtype bfloat16 \
        --device cuda --num-prompts 512 --min-len 128 --max-len 1024 --new-tokens 256 --no-hf
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def make_prompts(num: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=gen).tolist()
    # Keep clear of special ids at the bottom of the vocabulary.
    return [torch.randint(100, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_pagewire(llm, prompts, new_tokens: int) -> tuple[float, int]:
    from pagewire import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.reset_prefix_cache()  # every round computes every prompt, as transformers does
    sync(llm.engine.config.device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(llm.engine.config.device)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_hf(model, prompts, new_tokens: int, batch_size: int, device: str) -> tuple[float, int]:
    sync(device)
    start = time.perf_counter()
    total = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch):  # left padding, as generate expects
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        total += (out.shape[1] - width) * len(batch)
    sync(device)
    return time.perf_counter() - start, total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="default: the engine's (1024 on a large GPU, else 256)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="default: the engine's offline budget (16384 on a large GPU)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    parser.add_argument("--quantization", default=None, choices=("fp8",),
                        help="weights quantized at load")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks of one engine (one GPU each on CUDA)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1,
                        help="pipeline stages (times --tensor-parallel-size ranks); async "
                        "scheduling there means two micro-batches in the pipeline")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="pagewire's share of the GPU (leave room for transformers)")
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch"),
                        help="auto: Triton on CUDA; torch: the torch path everywhere")
    parser.add_argument("--no-hf", action="store_true", help="time pagewire alone")
    parser.add_argument("--hf-after", action="store_true",
                        help="run transformers after pagewire's rounds, with pagewire's memory "
                        "freed, so each gets the whole GPU (the issue's batches of 128 fit)")
    parser.add_argument("--async-scheduling", default="auto",
                        choices=("auto", "on", "off", "both"),
                        help="overlap step N+1's host work with step N (auto: on CUDA); both: "
                        "alternate on and off, round by round, on one engine")
    parser.add_argument("--full-warmup", action="store_true",
                        help="warm up on every prompt (Triton compiles each prefill shape's "
                        "specialization, graphs are captured) so round 1 is not penalised")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from pagewire import LLM

    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype,
              device=args.device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, kernels=args.kernels,
              kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
              tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size,
              gpu_memory_utilization=args.gpu_memory_utilization,
              async_scheduling={"on": True, "off": False}.get(args.async_scheduling),
              show_progress=False)
    spec = llm.engine.runner.spec
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len, spec.vocab_size,
                           args.seed)
    hf = None if args.no_hf or args.hf_after else load_hf(llm, args)
    # Warm-up: allocator, thread pools, lazy inits (and with --full-warmup, kernel
    # specializations and graph captures) stay out of the numbers.
    run_pagewire(llm, prompts if args.full_warmup else prompts[:4],
                 min(args.new_tokens, 32) if args.full_warmup else 4)
    if hf is not None:
        run_hf(hf, prompts[:4], 4, 4, args.device)

    variants = {"pagewire": None}
    if args.async_scheduling == "both":
        variants = {"pagewire (async)": True, "pagewire (sync)": False}
    results: dict[str, list[float]] = {**{name: [] for name in variants}, "transformers": []}
    for _ in range(args.rounds):
        if hf is not None:
            elapsed, tokens = run_hf(hf, prompts, args.new_tokens, args.hf_batch, args.device)
            results["transformers"].append(tokens / elapsed)
        for name, async_scheduling in variants.items():
            if async_scheduling is not None:
                # A benchmark-only switch: the engine reads the flag at every step (and the
                # scheduler its micro-batches, between rounds: nothing runs then).
                llm.engine.config = llm.engine.config.replace(async_scheduling=async_scheduling)
                llm.engine.scheduler.num_micro_batches = \
                    args.pipeline_parallel_size if async_scheduling else 1
            elapsed, tokens = run_pagewire(llm, prompts, args.new_tokens)
            results[name].append(tokens / elapsed)

    roofline = None
    if args.device.startswith("cuda"):
        roofline = roofline_report(llm, prompts, args, results[next(iter(variants))])
    if args.hf_after and not args.no_hf:
        results["transformers"] += run_hf_alone(llm, prompts, args)

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(args.device),
        "command": " ".join(sys.argv),
        "model": llm.engine.source.name, "dtype": str(llm.engine.config.torch_dtype),
        "kv_cache_dtype": str(llm.engine.config.kv_torch_dtype),
        "quantization": args.quantization,
        # What the weights take on the device (fp8: projections in one byte per weight).
        "weights_gib": sum(t.numel() * t.element_size() for t in
                           [*llm.engine.runner.model.parameters(),
                            *llm.engine.runner.model.buffers()]) / 2**30,
        "max_num_seqs": llm.engine.config.seq_limit,
        "max_num_batched_tokens": llm.engine.config.token_budget,
        "kernels": "triton" if llm.engine.config.use_triton else "torch",
        "workload": {k: getattr(args, k) for k in
                     ("num_prompts", "min_len", "max_len", "new_tokens", "hf_batch", "seed")},
        "async_scheduling": args.async_scheduling,
        "output_tokens_per_s": {k: v for k, v in results.items() if v},
    }
    if roofline is not None:
        report["roofline"] = roofline
    print_table(report, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def roofline_report(llm, prompts, args, tokens_per_s: list[float]) -> dict:
    from roofline import DeviceLimits, floor_seconds

    limits = DeviceLimits.measure(args.device)
    config = llm.engine.config
    floor = floor_seconds(llm.engine.runner.spec, [len(p) for p in prompts], args.new_tokens,
                          config.seq_limit, config.torch_dtype.itemsize, limits,
                          kv_dtype_bytes=config.kv_torch_dtype.itemsize)
    floor_tokens_per_s = len(prompts) * args.new_tokens / floor["floor_s"]
    return {"matmul_tflops": limits.matmul_flops_per_s / 1e12,
            "copy_tb_per_s": limits.copy_bytes_per_s / 1e12, **floor,
            "floor_tokens_per_s": floor_tokens_per_s,
            "fraction_of_floor": statistics.median(tokens_per_s) / floor_tokens_per_s}


def run_hf_alone(llm, prompts, args) -> list[float]:
    """transformers' rounds after pagewire's KV cache, graphs and weights are freed (the
    engine keeps only its config and source for load_hf)."""
    import gc

    runner = llm.engine.runner
    runner.model = runner.kv_cache = runner.layer_caches = runner.decode_graphs = None
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        print(f"freed pagewire: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still "
              "allocated", flush=True)
    hf = load_hf(llm, args)
    run_hf(hf, prompts[:4], 4, 4, args.device)
    tokens_per_s = []
    for _ in range(args.rounds):
        elapsed, tokens = run_hf(hf, prompts, args.new_tokens, args.hf_batch, args.device)
        tokens_per_s.append(tokens / elapsed)
    return tokens_per_s


def load_hf(llm, args):
    from transformers import AutoModelForCausalLM

    source = llm.engine.source
    dtype = llm.engine.config.torch_dtype
    if args.load_format == "dummy":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.model_dir)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=dtype)
    return model.to(args.device).eval()


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(report: dict, results: dict[str, list[float]]) -> None:
    print(f"\n{report['model']} {report['dtype']} (KV {report['kv_cache_dtype']}, "
          f"{report['max_num_seqs']} seqs, {report['max_num_batched_tokens']} tokens a step) "
          f"on {report['machine']}")
    print(f"workload: {report['workload']}")
    print(f"{'engine':<18}{'median tok/s':>14}{'runs':>30}")
    for name, values in results.items():
        if values:
            runs = ", ".join(f"{v:.1f}" for v in values)
            print(f"{name:<18}{statistics.median(values):>14.1f}{runs:>30}")
    first = next(iter(results))
    if results["transformers"]:
        ratio = statistics.median(results[first]) / statistics.median(results["transformers"])
        print(f"{first} / transformers: {ratio:.2f}x")
    if "pagewire (sync)" in results:
        ratio = statistics.median(results[first]) / statistics.median(results["pagewire (sync)"])
        print(f"async / sync scheduling: {ratio:.2f}x")
    if "roofline" in report:
        r = report["roofline"]
        print(f"roofline floor: {r['floor_s']:.1f} s (prefill {r['prefill_s']:.1f} s at "
              f"{r['matmul_tflops']:.0f} TFLOP/s, decode {r['decode_s']:.1f} s at "
              f"{r['copy_tb_per_s']:.2f} TB/s) = {r['floor_tokens_per_s']:.0f} tok/s; "
              f"{first} reaches {r['fraction_of_floor']:.0%} of it")


if __name__ == "__main__":
    sys.exit(main())
