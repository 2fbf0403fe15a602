"""Serving throughput through the whole pipeline against the offline engine, and the time to
first token of a prefix-cache hit against a miss.

Each configuration is started with `pagewire up` (tokenizer, router, workers and gateway as real
processes) and driven over HTTP through the OpenAI /v1/completions API, streaming, with
token-id prompts:

- throughput: N requests of `prompt_len` random token ids (seeded) and exactly `output_len`
  output tokens (EOS ignored, greedy), sent all at once. The offline engine (pagewire.LLM, same
  model, same prompts and parameters, in this process) runs the same batch in the same round;
  configurations and the offline engine alternate `rounds` times, each round on fresh prompts
  so no run gets another's prefix hits. The goal: the pipeline keeps >= 80% of offline.
- prefix cache: for each of `num_prefixes` random prefixes of `prefix_len` tokens, one request
  (a miss) and then a second with the same prefix and another suffix (a hit), one at a time;
  the medians of their TTFTs and the hits' usage.prompt_tokens_details.cached_tokens.

    python loadtests/pipeline_throughput.py                           # disaggregated 1P + 1D
    python loadtests/pipeline_throughput.py --configs disagg colocated --rounds 3
    python loadtests/pipeline_throughput.py --num-requests 4 --output-len 8 --rounds 1 \
        --num-prefixes 2 --json /tmp/smoke.json                       # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from local_stack import CONFIGS, PipelineProcess  # beside this script

from pagewire.bench.client import (
    COMPLETIONS_PATH,
    RequestResult,
    completion_body,
    new_client,
    stream_request,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- one streamed request (pagewire bench's client: timed as `vllm bench serve` times it) ----

async def stream_completion(client: httpx.AsyncClient, model: str, prompt: list[int],
                            max_tokens: int) -> RequestResult:
    body = completion_body(model, prompt, max_tokens, ignore_eos=True, temperature=0)
    result = await stream_request(client, COMPLETIONS_PATH, body)
    if not result.ok:
        raise RuntimeError(result.error)
    return result


# ---- the two workloads -----------------------------------------------------------------------

def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Keep clear of special ids at the bottom of the vocabulary.
    return torch.randint(100, vocab, (num, length), generator=gen).tolist()


@dataclass
class Saturation:
    output_tokens_per_s: float
    elapsed_s: float
    requests: list[RequestResult] = field(repr=False)


async def saturate(url: str, model: str, prompts: list[list[int]], output_len: int) -> Saturation:
    async with new_client(url) as client:
        start = time.perf_counter()
        requests = await asyncio.gather(*[stream_completion(client, model, p, output_len)
                                          for p in prompts])
        elapsed = time.perf_counter() - start
    wrong = [r.output_tokens for r in requests if r.output_tokens != output_len]
    if wrong:
        raise RuntimeError(f"asked for {output_len} tokens each, some got {wrong}")
    return Saturation(sum(r.output_tokens for r in requests) / elapsed, elapsed, requests)


def run_offline(llm, prompts: list[list[int]], output_len: int) -> tuple[float, list[str]]:
    """Output tokens/s of the offline engine on the same batch, and its texts."""
    from pagewire import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.reset_prefix_cache()  # as the pipeline's workers, it has never seen these prompts
    sync(llm.engine.config.device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(llm.engine.config.device)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, [o.outputs[0].text
                                                                      for o in outs]


async def prefix_ttft(url: str, model: str, args, vocab: int) -> dict:
    """Miss then hit for each shared prefix, one request at a time."""
    prefixes = random_prompts(args.num_prefixes, args.prefix_len, vocab, args.seed + 10_000)
    suffixes = random_prompts(2 * args.num_prefixes, args.suffix_len, vocab, args.seed + 20_000)
    misses, hits = [], []
    async with new_client(url) as client:
        for i, prefix in enumerate(prefixes):
            misses.append(await stream_completion(client, model, prefix + suffixes[2 * i], 4))
            hits.append(await stream_completion(client, model, prefix + suffixes[2 * i + 1], 4))
    miss_ttft = statistics.median(r.ttft_s for r in misses)
    hit_ttft = statistics.median(r.ttft_s for r in hits)
    return {"miss_ttft_ms": [round(r.ttft_s * 1000, 1) for r in misses],
            "hit_ttft_ms": [round(r.ttft_s * 1000, 1) for r in hits],
            "median_miss_ttft_ms": miss_ttft * 1000, "median_hit_ttft_ms": hit_ttft * 1000,
            "miss_over_hit": miss_ttft / hit_ttft,
            "miss_cached_tokens": [r.cached_tokens for r in misses],
            "hit_cached_tokens": [r.cached_tokens for r in hits]}


# ---- the run ---------------------------------------------------------------------------------

def main() -> int:
    args = parse_args()
    from pagewire import LLM

    stacks = {name: PipelineProcess(name, args.kv_cache_bytes, args.model, args.verbose)
              for name in args.configs}
    try:
        llm = LLM(model=args.model, kv_cache_memory_bytes=args.kv_cache_bytes,
                  show_progress=False)
        for stack in stacks.values():
            stack.wait_ready()
        report = measure(args, llm, stacks)
    finally:
        for stack in stacks.values():
            stack.stop()
    print_table(report)
    path = Path(args.json) if args.json else RESULTS_DIR / (
        f"{report['date']}-{device_tag()}-pipeline-throughput.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    failed = [name for name, r in report["prefix_cache"].items()
              if min(r["hit_cached_tokens"]) <= 0]
    if failed:
        print(f"prefix-cache hits reported no cached tokens in: {', '.join(failed)}")
    return 1 if failed else 0


def measure(args, llm, stacks: dict[str, PipelineProcess]) -> dict:
    vocab = llm.engine.runner.spec.vocab_size
    model = llm.engine.source.name
    # Warm-up: allocator, thread pools, gRPC channels and lazy inits stay out of the numbers.
    warm = random_prompts(4, args.prompt_len, vocab, args.seed + 30_000)
    run_offline(llm, warm, 4)
    for stack in stacks.values():
        asyncio.run(saturate(stack.url, model, warm, 4))
    rates: dict[str, list[float]] = {"offline": [], **{name: [] for name in stacks}}
    runs: dict[str, list[dict]] = {name: [] for name in stacks}
    for round_index in range(args.rounds):
        prompts = random_prompts(args.num_requests, args.prompt_len, vocab,
                                 args.seed + round_index)
        rate, offline_texts = run_offline(llm, prompts, args.output_len)
        rates["offline"].append(rate)
        for name, stack in stacks.items():
            result = asyncio.run(saturate(stack.url, model, prompts, args.output_len))
            rates[name].append(result.output_tokens_per_s)
            runs[name].append(describe_run(result, offline_texts))
    prefix = {name: asyncio.run(prefix_ttft(stack.url, model, args, vocab))
              for name, stack in stacks.items()}
    return build_report(args, llm, stacks, rates, runs, prefix)


def describe_run(result: Saturation, offline_texts: list[str]) -> dict:
    ttfts = sorted(r.ttft_s for r in result.requests)
    tpots = sorted(r.tpot_s for r in result.requests if r.output_tokens > 1)
    return {"output_tokens_per_s": result.output_tokens_per_s, "elapsed_s": result.elapsed_s,
            "median_ttft_ms": statistics.median(ttfts) * 1000,
            "p90_ttft_ms": quantile(ttfts, 0.9) * 1000,
            "median_tpot_ms": statistics.median(tpots) * 1000 if tpots else None,
            "p90_tpot_ms": quantile(tpots, 0.9) * 1000 if tpots else None,
            "greedy_texts_equal_offline": sum(r.text == t for r, t in
                                              zip(result.requests, offline_texts, strict=True))}


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def build_report(args, llm, stacks, rates, runs, prefix) -> dict:
    offline = statistics.median(rates["offline"])
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(llm.engine.config.device),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "stacks": {name: stack.command for name, stack in stacks.items()},
        "model": llm.engine.source.name, "dtype": str(llm.engine.config.torch_dtype),
        "workload": {k: getattr(args, k) for k in
                     ("num_requests", "prompt_len", "output_len", "rounds", "seed",
                      "num_prefixes", "prefix_len", "suffix_len", "kv_cache_bytes")},
        "output_tokens_per_s": rates,
        "pipeline_over_offline": {name: statistics.median(rates[name]) / offline
                                  for name in stacks},
        "per_round_ratio": {name: [p / o for p, o in zip(rates[name], rates["offline"])]
                            for name in stacks},
        "runs": runs,
        "prefix_cache": prefix,
    }


def print_table(report: dict) -> None:
    print(f"\n{report['model']} {report['dtype']} on {report['machine']}")
    print(f"workload: {report['workload']}")
    print(f"{'engine':<12}{'median tok/s':>14}{'vs offline':>12}{'TTFT p50 ms':>13}"
          f"{'TPOT p50 ms':>13}   rounds")
    for name, values in report["output_tokens_per_s"].items():
        ratio = report["pipeline_over_offline"].get(name)
        last = report["runs"].get(name, [{}])[-1]
        print(f"{name:<12}{statistics.median(values):>14.1f}"
              f"{f'{ratio:.2f}x' if ratio else '':>12}"
              f"{fmt(last.get('median_ttft_ms')):>13}{fmt(last.get('median_tpot_ms')):>13}   "
              + ", ".join(f"{v:.1f}" for v in values))
    print(f"\n{'prefix cache':<12}{'miss TTFT ms':>14}{'hit TTFT ms':>13}{'miss/hit':>10}"
          f"{'hit cached tokens':>19}")
    for name, r in report["prefix_cache"].items():
        print(f"{name:<12}{r['median_miss_ttft_ms']:>14.1f}{r['median_hit_ttft_ms']:>13.1f}"
              f"{r['miss_over_hit']:>9.2f}x{min(r['hit_cached_tokens']):>19}")


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name().split()[1].lower()  # "NVIDIA H100 80GB HBM3" -> h100


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["disagg"],
                        help="pipelines to measure (disagg: 1 prefill + 1 decode worker; "
                             "colocated: 1 worker doing both)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20,
                        help="KV cache of each worker and of the offline engine")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=640)
    parser.add_argument("--suffix-len", type=int, default=16)
    parser.add_argument("--json", default=None,
                        help="default: loadtests/results/DATE-DEVICE-pipeline-throughput.json")
    parser.add_argument("--verbose", action="store_true", help="echo the services' output")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
