"""The KV transfer itself: bytes/s and the latency it adds, against prompt length and transport.

For each transport a prefill and a decode worker run as processes of their own (`pagewire serve
worker`, as deployed), limited to that transport, driven as the router drives them: reserve on
the decode worker, Prefill (compute, then send the KV), then read the first token from the
decode stream. For each prompt length it reports the KV bytes, the push time the prefill worker
measured (what the gateway's `pagewire:kv_transfer_seconds` counts), bytes/s, and the push's
share of the time to first token. One request at a time, one pair after another, the same
prompts for each, so nothing else competes; every transport's tokens must equal the last one's
(gRPC bytes, when listed last): the KV that arrived decodes the same.

    python loadtests/kv_transfer.py --lengths 128 512 1024 2048 4096 --repeats 3
    python loadtests/kv_transfer.py --transports shm nixl grpc --lengths 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import grpc

from pagewire.import_roots import pagewire_argv
from pagewire.kv_transport import KV_TRANSPORTS
from pagewire.launcher import free_port, grpc_healthy
from pagewire.v1 import common_pb2, worker_pb2, worker_pb2_grpc

READY_TIMEOUT_S = 600.0


async def one_request(prefill, decode, decode_address: str, rid: str, prompt: list[int]):
    # Four tokens: the decode worker computes three of them on the KV that came, so every
    # transport's tokens must equal the others' (checked in measure()).
    sampling = common_pb2.SamplingOptions(temperature=0, max_tokens=4, ignore_eos=True)
    start = time.perf_counter()
    stream = decode.Decode(worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, transfer_timeout_ms=60000))
    reserved = await stream.read()
    prefilled = await prefill.Prefill(worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling,
        decode_worker_address=decode_address, skip_blocks=reserved.reserved.skip_blocks,
        decode_block_ids=reserved.reserved.block_ids, decode_cache_id=reserved.reserved.cache_id,
        timeout_ms=60000))
    tokens, ttft_ms = [], 0.0
    while (message := await stream.read()) != grpc.aio.EOF:
        if message.tokens.token_ids and not tokens:
            ttft_ms = (time.perf_counter() - start) * 1000
        tokens += message.tokens.token_ids
    assert prefilled.kv_transport, "the prefill worker names no transport"
    return (prefilled.kv_bytes, prefilled.kv_transfer_us / 1000, ttft_ms,
            prefilled.kv_transport, tokens)


class Pair:
    """A prefill and a decode worker process that may use only `transport` between them."""

    def __init__(self, transport: str):
        self.transport = transport

    async def start(self, worker_flags: list[str]) -> Pair:
        self.ports = [free_port(), free_port()]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.processes = [subprocess.Popen(
            pagewire_argv("serve", "worker", "--role", role, "--port", str(port),
                          "--kv-transports", self.transport, *worker_flags), env=env,
            stdout=subprocess.DEVNULL if role == "prefill" else None)
            for role, port in zip(("prefill", "decode"), self.ports)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for process, port in zip(self.processes, self.ports):
            while not await asyncio.to_thread(grpc_healthy, f"127.0.0.1:{port}"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {self.transport} pair's worker on {port} did not "
                                       "come up")
                await asyncio.sleep(0.5)
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in self.ports]
        self.prefill, self.decode = (worker_pb2_grpc.WorkerStub(c) for c in self.channels)
        self.decode_address = f"127.0.0.1:{self.ports[1]}"
        return self

    async def request(self, rid: str, prompt: list[int]):
        return await one_request(self.prefill, self.decode, self.decode_address, rid, prompt)

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(30)


async def measure(args) -> list[dict]:
    """Every transport's rows; printed, and written to --json, as each pair finishes (a run
    cut short keeps what it measured)."""
    flags = ["--kv-cache-bytes", str(args.kv_cache_bytes), "--load-format", args.load_format]
    flags += ["--model", args.model] if args.model else []
    ids = args.vocab - 100
    rows: list[dict] = []
    reference: dict[int, list] = {}  # the first transport's tokens per prompt length
    print(f"{'transport':>9} {'prompt':>8} {'KV MB':>8} {'push ms':>8} {'MB/s':>8} "
          f"{'TTFT ms':>8} {'push/TTFT':>9}", flush=True)
    # One pair at a time (two 8B models per pair fill most of a GPU), the same prompts for each.
    for transport in args.transports:
        pair = await Pair(transport).start(flags)
        try:
            for warm_up in range(3):  # compiles, CUDA graphs, the first handshake
                await pair.request(f"warm-up-{warm_up}", list(range(100 + warm_up, 164)))
            for length in args.lengths:
                results = []
                for i in range(args.repeats):  # no two share a first block: no cache hits
                    start = (i * 7919 + length * 104729) % ids
                    prompt = [100 + (start + t) % ids for t in range(length)]
                    results.append(await pair.request(f"r{length}-{i}", prompt))
                rows.append(summary(transport, length, results, reference))
                write(args, rows)
        finally:
            await pair.stop()
    return rows


def summary(transport: str, length: int, results: list, reference: dict[int, list]) -> dict:
    used = {r[3] for r in results}
    assert used == {transport}, f"asked for {transport}, the workers used {used}"
    tokens = [r[4] for r in results]
    assert reference.setdefault(length, tokens) == tokens, \
        f"{transport} gave other tokens than the first transport for {length}-token prompts"
    size = results[0][0]
    push_ms = statistics.median(r[1] for r in results)
    ttft_ms = statistics.median(r[2] for r in results)
    row = {"transport": transport, "prompt_tokens": length, "kv_bytes": size,
           "push_ms": push_ms, "bytes_per_s": size / (push_ms / 1000) if push_ms else None,
           "ttft_ms": ttft_ms, "push_share_of_ttft": push_ms / ttft_ms}
    print(f"{transport:>9} {length:>8} {size / 1e6:>8.1f} {push_ms:>8.1f} "
          f"{(row['bytes_per_s'] or 0) / 1e6:>8.0f} {ttft_ms:>8.0f} "
          f"{row['push_share_of_ttft']:>9.1%}", flush=True)
    return row


def write(args, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=2)


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
    parser.add_argument("--transports", nargs="+", default=["grpc"], choices=KV_TRANSPORTS,
                        help="one worker pair each, one after another")
    parser.add_argument("--vocab", type=int, default=30000, help="prompt ids are drawn below")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    rows = asyncio.run(measure(args))
    for length in args.lengths:
        rate = {r["transport"]: r["bytes_per_s"] for r in rows if r["prompt_tokens"] == length}
        for transport, value in rate.items():
            if rate.get("grpc") and transport != "grpc" and value:
                print(f"{length} tokens: {transport} moves KV {value / rate['grpc']:.1f}x as "
                      "fast as grpc")
    return 0


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
