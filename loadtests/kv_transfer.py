"""The KV transfer itself: bytes/s and the latency it adds, against prompt length.

A prefill and a decode worker run on loopback in this process, driven as the router drives
them: reserve on the decode worker, Prefill (compute, then push the KV with PushKV), then read
the first token from the decode stream. For each prompt length it reports the KV bytes, the
push time the prefill worker measured, bytes/s, and the push's share of the time to first
token. One request at a time, so nothing else competes.

    python loadtests/kv_transfer.py --lengths 128 512 1024 2048 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time

import grpc

from pagewire.config import EngineConfig
from pagewire.services.worker.config import WorkerConfig
from pagewire.services.worker.server import serve, stop
from pagewire.v1 import common_pb2, worker_pb2, worker_pb2_grpc


async def one_request(prefill, decode, decode_address: str, rid: str, prompt: list[int]):
    sampling = common_pb2.SamplingOptions(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    stream = decode.Decode(worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, transfer_timeout_ms=60000))
    reserved = await stream.read()
    prefilled = await prefill.Prefill(worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling,
        decode_worker_address=decode_address, skip_blocks=reserved.reserved.skip_blocks,
        timeout_ms=60000))
    while (message := await stream.read()) != grpc.aio.EOF:
        if message.tokens.token_ids:
            break
    ttft_ms = (time.perf_counter() - start) * 1000
    stream.cancel()
    return prefilled.kv_bytes, prefilled.kv_transfer_ms, ttft_ms


async def measure(lengths: list[int], repeats: int, kv_bytes: int, model: str | None = None,
                  load_format: str = "auto") -> list[dict]:
    engine = EngineConfig(model=model, load_format=load_format, kv_cache_memory_bytes=kv_bytes,
                          enable_prefix_caching=False, show_progress=False)
    servers = [await serve(WorkerConfig(role=role, port=0, engine=engine))
               for role in ("prefill", "decode")]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.bound_port}") for s in servers]
    prefill, decode = (worker_pb2_grpc.WorkerStub(c) for c in channels)
    decode_address = f"127.0.0.1:{servers[1].bound_port}"
    ids = min(30000, servers[0].async_engine.engine.runner.spec.vocab_size - 100)
    rows = []
    try:
        await one_request(prefill, decode, decode_address, "warm-up", list(range(100, 164)))
        for length in lengths:
            runs = [await one_request(prefill, decode, decode_address, f"r{length}-{i}",
                                      [100 + (i * 7919 + t) % ids for t in range(length)])
                    for i in range(repeats)]
            size = runs[0][0]
            push_ms = statistics.median(r[1] for r in runs)
            ttft_ms = statistics.median(r[2] for r in runs)
            rows.append({"prompt_tokens": length, "kv_bytes": size, "push_ms": push_ms,
                         "bytes_per_s": size / (push_ms / 1000) if push_ms else None,
                         "ttft_ms": ttft_ms, "push_share_of_ttft": push_ms / ttft_ms})
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await stop(server, 0)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--load-format", default="auto",
                        help="dummy: random weights for --model's config (a GPU run of a "
                             "config from loadtests/configs; both workers share the GPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.lengths, args.repeats, args.kv_cache_bytes, args.model,
                               args.load_format))
    print(f"{'prompt':>8} {'KV MB':>8} {'push ms':>8} {'MB/s':>8} {'TTFT ms':>8} {'push/TTFT':>9}")
    for r in rows:
        print(f"{r['prompt_tokens']:>8} {r['kv_bytes'] / 1e6:>8.1f} {r['push_ms']:>8.0f} "
              f"{(r['bytes_per_s'] or 0) / 1e6:>8.0f} {r['ttft_ms']:>8.0f} "
              f"{r['push_share_of_ttft']:>9.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    return 0


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
