"""`pagewire up`: the whole pipeline on one machine, one process per service, each started with
the same `pagewire serve ROLE` command compose uses. Prints the URL once every service is
healthy; Ctrl-C (or SIGTERM) stops every process it started, the private Redis included.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pagewire.cluster.routing import ROUTING_POLICIES
from pagewire.import_roots import pagewire_argv

READY_TIMEOUT_S = 300.0


@dataclass
class Stack:
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        process = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent,
                                   env=env)
        self.processes.append((name, process))

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}")

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for _, process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """Linux: the service gets SIGTERM if `pagewire up` itself dies, even by SIGKILL, so a
    killed launcher never leaves services behind (each runs in its own session, out of reach
    of a signal sent to the launcher's process group)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


_HANDED_OUT: deque[int] = deque(maxlen=4096)  # this process's recent answers, not given twice


def free_port() -> int:
    """A port free now, for a process started next to bind. Taken below the kernel's ephemeral
    range: a port bind(0) hands out and we close can be handed out again to the next bind(0) in
    any process (a NIXL worker's UCX listeners bind many) before ours binds it; seen in CI as a
    worker that could not bind its port. The kernel never hands out ports below the range. Nor
    is a port handed out twice by this process: several ports are picked before any is bound
    (a cluster's services), and a random pick can repeat; seen in CI as a gateway whose port a
    worker's gRPC server held."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low) if low > 11000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _HANDED_OUT.append(port)
        return port
    raise RuntimeError("found no free TCP port")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: let the kernel pick


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1,
                                          socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def grpc_healthy(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagewire up", description=__doc__)
    parser.add_argument("--model", default=os.environ.get("PAGEWIRE_MODEL"),
                        help="model directory or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--host", default="127.0.0.1", help="the gateway's interface")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--colocated", type=int, default=0,
                        help="workers that do both (with --prefill 0 --decode 0: plain vLLM)")
    parser.add_argument("--redis-url", default=os.environ.get("PAGEWIRE_REDIS_URL",
                                                              "redis://127.0.0.1:6379/0"))
    parser.add_argument("--api-key", default=os.environ.get("PAGEWIRE_API_KEY"))
    parser.add_argument("--routing", default=os.environ.get("PAGEWIRE_ROUTING_POLICY", "prefix"),
                        choices=ROUTING_POLICIES, help="how the router picks prefill workers")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="KV cache budget per worker")
    parser.add_argument("--load-format", default=None,
                        help="workers' weights: auto | safetensors | gguf | dummy (random, for "
                             "benchmarks)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="workers' context limit")
    # pagewire.config.KV_CACHE_DTYPES, spelt out: the launcher imports no torch
    parser.add_argument("--kv-cache-dtype", default=None, choices=("auto", "fp8", "fp8_e4m3"),
                        help="workers' KV cache: fp8 halves its bytes per token (lossy)")
    # pagewire.model.quantization.METHODS, spelt out: the launcher imports no torch
    parser.add_argument("--quantization", default=None,
                        choices=("fp8", "compressed-tensors", "gptq", "awq", "gguf"),
                        help="fp8: workers quantize their weights at load; gguf: a .gguf "
                             "model's weights stay in its blocks; a checkpoint's own "
                             "(compressed-tensors, GPTQ, AWQ) is detected without it")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="workers' tensor parallelism: each worker runs this many "
                             "processes, each with a slice of every layer")
    parser.add_argument("--pipeline-parallel-size", type=int, default=None,
                        help="workers' pipeline parallelism: each worker's layers split into "
                             "this many stages (times --tensor-parallel-size processes)")
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='decode and colocated workers speculate: {"method": "ngram", '
                             '"num_speculative_tokens": 4}, vLLM\'s keys')
    parser.add_argument("--kv-transports", default=None,
                        help="KV transports workers may use, fastest first, from cuda_ipc, "
                             "shm, nixl, grpc (default: all; gRPC bytes stay the fallback)")
    parser.add_argument("--max-local-prefill-tokens", type=int, default=None,
                        help="the router computes a prompt on its decode worker when that "
                             "worker lacks at most this many of its tokens (default 0)")
    parser.add_argument("--worker-gpus", type=_gpu_list, default=None, metavar="0,1,...",
                        help="pin worker i (prefill first, then decode, then colocated) to GPU "
                             "i mod N through CUDA_VISIBLE_DEVICES; with T x P tensor x "
                             "pipeline ranks, to T x P consecutive GPUs of the list (one per "
                             "rank)")
    return parser


def _gpu_list(text: str) -> list[str]:
    gpus = [gpu.strip() for gpu in text.split(",")]
    if not all(gpus):
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1; got {text!r}")
    return gpus


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prefill + args.colocated < 1 or args.decode + args.colocated < 1:
        print("pagewire up: need at least one prefill and one decode worker (or --colocated)",
              file=sys.stderr)
        return 2
    stack = Stack()
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Also SIGINT: a shell starting us in the background leaves it ignored, and Python then
    # never turns it into KeyboardInterrupt.
    signal.signal(signal.SIGINT, on_signal)
    try:
        redis_url = _redis(args, stack)
        if redis_url is None:
            return 1
        _start_services(args, stack, redis_url)
        print(f"pagewire: serving on http://{args.host}:{args.port}/v1 "
              f"(model: {args.model or 'SmolLM2-135M-Instruct'}); Ctrl-C stops it", flush=True)
        while True:
            stack.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("pagewire: stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"pagewire up: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def _redis(args, stack: Stack) -> str | None:
    if redis_answers(args.redis_url):
        return args.redis_url
    server = shutil.which("redis-server")
    if server is None:
        print(f"pagewire up: no Redis answers at {args.redis_url} and no redis-server is "
              "installed. Start one (Debian/Ubuntu: apt-get install redis-server; macOS: brew "
              "install redis) or pass --redis-url.", file=sys.stderr)
        return None
    port = free_port()
    stack.start("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"])
    url = f"redis://127.0.0.1:{port}/0"
    _wait(stack, "redis", lambda: redis_answers(url))
    print(f"pagewire: started a private redis-server on port {port}", flush=True)
    return url


def _start_services(args, stack: Stack, redis_url: str) -> None:
    serve = pagewire_argv("serve")
    namespace = f"pagewire-up-{os.getpid()}"  # a shared Redis never mixes two stacks' workers
    model = ["--model", args.model] if args.model else []
    tokenizer_port, router_port = free_port(), free_port()
    context = ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    stack.start("tokenizer", serve + ["tokenizer", "--port", str(tokenizer_port)] + model +
                context)  # the gateway learns the workers' context limit from it
    workers = []
    for role, count in (("prefill", args.prefill), ("decode", args.decode),
                        ("both", args.colocated)):
        for _ in range(count):
            port = free_port()
            stack.start(f"{role} worker", serve + [
                "worker", "--role", role, "--port", str(port), "--redis-url", redis_url,
                "--redis-namespace", namespace] + model + _worker_flags(args, role),
                env=_worker_env(args, len(workers)))
            workers.append(f"127.0.0.1:{port}")
    placement = [] if args.max_local_prefill_tokens is None else \
        ["--max-local-prefill-tokens", str(args.max_local_prefill_tokens)]
    stack.start("router", serve + ["router", "--port", str(router_port), "--redis-url",
                                   redis_url, "--redis-namespace", namespace,
                                   "--policy", args.routing] + placement)
    for name, address in [("tokenizer", f"127.0.0.1:{tokenizer_port}"),
                          ("router", f"127.0.0.1:{router_port}")] + \
            [("worker", a) for a in workers]:
        _wait(stack, name, lambda a=address: grpc_healthy(a))
    gateway = serve + ["gateway", "--host", args.host, "--port", str(args.port),
                       "--tokenizer-address", f"127.0.0.1:{tokenizer_port}",
                       "--router-address", f"127.0.0.1:{router_port}"]
    if args.api_key:
        gateway += ["--api-key", args.api_key]
    stack.start("gateway", gateway)
    _wait(stack, "gateway", lambda: http_healthy(f"http://127.0.0.1:{args.port}/health"))


def _worker_flags(args, role: str) -> list[str]:
    flags = []
    # A prefill worker samples one token per request: it has nothing to speculate on.
    speculative = args.speculative_config if role != "prefill" else None
    for flag, value in (("--kv-cache-bytes", args.kv_cache_bytes or None),
                        ("--load-format", args.load_format),
                        ("--max-model-len", args.max_model_len),
                        ("--kv-cache-dtype", args.kv_cache_dtype),
                        ("--kv-transports", args.kv_transports),
                        ("--quantization", args.quantization),
                        ("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--pipeline-parallel-size", args.pipeline_parallel_size),
                        ("--speculative-config", speculative)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def _worker_env(args, index: int) -> dict[str, str] | None:
    """The environment of the index-th worker: its own GPUs when --worker-gpus is given (as many
    as its parallel ranks, consecutive in the list, wrapping around)."""
    if not args.worker_gpus:
        return None
    gpus = args.worker_gpus
    ranks = (args.tensor_parallel_size or 1) * (args.pipeline_parallel_size or 1)
    mine = [gpus[(index * ranks + rank) % len(gpus)] for rank in range(ranks)]
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(mine)}


def _wait(stack: Stack, name: str, ready) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        stack.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not ready within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.3)
