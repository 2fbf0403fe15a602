"""Does a decode worker keep its streams' pace while prompts' KV arrives? (issue 14)

Starts `pagewire up --prefill 1 --decode 1` and keeps `--streams` long generations running on
the decode worker. Phase "alone": nothing else arrives. Phase "transfers": a Poisson flow of
`--arrival-rate` requests with `--prompt-len`-token prompts and max_tokens=1 arrives as well;
each one is a KV transfer into the decode worker (reserve, receive, commit), and its one token
comes from the prefill worker, so the decode worker gains no decode work from it. The inter-
token gaps of the long streams in each phase are compared: p50 and p99, and their ratio.

    python loadtests/itl_under_transfers.py --streams 8 --phase-s 20 --arrival-rate 2
    python loadtests/itl_under_transfers.py --model /tmp/llama3-8b --load-format dummy \\
        --kv-transports cuda_ipc --streams 16 --prompt-len 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from local_stack import PipelineProcess

from pagewire.bench.client import completion_body, first_model, new_client, stream_request


async def long_streams(client, model: str, count: int, until: float, prompt_len: int,
                       vocab: int, gaps: list[float]) -> None:
    """`count` streams, each restarted as it ends, until `until`; their gaps go to `gaps`."""
    async def one(index: int) -> None:
        while time.perf_counter() < until:
            prompt = [100 + (index * 131 + t) % vocab for t in range(prompt_len)]
            result = await stream_request(client, "/v1/completions", completion_body(
                model, prompt, 256, ignore_eos=True))
            if not result.ok:
                raise RuntimeError(result.error)
            ends = [result.start_s + result.ttft_s]
            for gap in result.itl_s:
                ends.append(ends[-1] + gap)
            gaps.extend(g for g, end in zip(result.itl_s, ends[1:]) if end < until)
    await asyncio.gather(*(one(i) for i in range(count)))


async def arrivals(client, model: str, rate: float, until: float, prompt_len: int,
                   vocab: int, seed: int) -> int:
    """Poisson arrivals of one-token requests with fresh prompts; returns how many ran."""
    rng, tasks = random.Random(seed), []
    while (now := time.perf_counter()) < until:
        prompt = [100 + rng.randrange(vocab - 100) for _ in range(prompt_len)]
        tasks.append(asyncio.create_task(stream_request(client, "/v1/completions",
                                                        completion_body(model, prompt, 1,
                                                                        ignore_eos=True))))
        await asyncio.sleep(min(rng.expovariate(rate), max(until - now, 0)))
    results = await asyncio.gather(*tasks)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} arrivals failed: {failed[0]}")
    return len(results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def measure(url: str, args) -> dict:
    async with new_client(url) as client:
        model = await first_model(client)
        await long_streams(client, model, args.streams, time.perf_counter() + 5, 16,
                           args.vocab, [])  # warm-up: compiles, graphs
        await arrivals(client, model, 2.0, time.perf_counter() + 3, args.prompt_len,
                       args.vocab, seed=1)
        phases = {}
        for phase in ("alone", "transfers"):
            gaps: list[float] = []
            until = time.perf_counter() + args.phase_s
            work = [long_streams(client, model, args.streams, until, 16, args.vocab, gaps)]
            if phase == "transfers":
                work.append(arrivals(client, model, args.arrival_rate, until, args.prompt_len,
                                     args.vocab, seed=2))
            done = await asyncio.gather(*work)
            phases[phase] = {"gaps": len(gaps), "itl_p50_ms": percentile(gaps, 0.5) * 1e3,
                             "itl_p99_ms": percentile(gaps, 0.99) * 1e3,
                             "arrivals": done[1] if phase == "transfers" else 0}
        metrics = (await client.get("/metrics")).text
    kv = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
          for line in metrics.splitlines()
          if line.startswith("pagewire:kv_transfer_bytes_total")}
    return {"phases": phases, "kv_transfer_bytes": kv,
            "p99_ratio": phases["transfers"]["itl_p99_ms"] / phases["alone"]["itl_p99_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--arrival-rate", type=float, default=2.0, help="requests/s")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument("--kv-transports", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    flags = [f for name in ("load_format", "kv_transports") if getattr(args, name)
             for f in (f"--{name.replace('_', '-')}", getattr(args, name))]
    stack = PipelineProcess("disagg", args.kv_cache_bytes, args.model, args.verbose, flags)
    try:
        stack.wait_ready()
        record = asyncio.run(measure(stack.url, args))
    finally:
        stack.stop()
    for phase, row in record["phases"].items():
        print(f"{phase:>9}: {row['gaps']:>6} gaps, ITL p50 {row['itl_p50_ms']:7.1f} ms, "
              f"p99 {row['itl_p99_ms']:7.1f} ms, {row['arrivals']} arrivals")
    print(f"ITL p99 with transfers / without: {record['p99_ratio']:.2f}x; KV moved: "
          f"{record['kv_transfer_bytes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "stack": stack.command, **record}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
