"""Throughput and latency against request rate (and concurrency) for local deployments, each
deployment's curves on one plot.

Each configuration (local_stack.CONFIGS: disagg = 1 prefill + 1 decode worker, colocated = 1
worker doing both, colocated-2 = 2 such workers) is started with `pagewire up`, swept with
`pagewire bench sweep` at the given rates (then, with --concurrencies, at those concurrency
caps), and stopped before the next one starts, so no two stacks share the machine. The server's
own counters (KV transfer seconds and bytes) are recorded with every point; --warmup-prompts
sends an unrecorded burst first. Then every
configuration's curves are drawn together. Flags after `--` go to `pagewire bench sweep`.

    python loadtests/serving_sweep.py --configs disagg colocated --rates 0.5 1 2 inf \\
        -- --num-prompts 64 --input-len 256 --output-len 64 --goodput ttft:2000 tpot:300
    python loadtests/serving_sweep.py --rates 2 inf -- --num-prompts 4 --input-len 16 \\
        --output-len 4                                                    # a smoke run
    # on two GPUs, one worker on each (loadtests/gpu_serving.sh):
    python loadtests/serving_sweep.py --configs disagg colocated-2 --model DIR \\
        --load-format dummy --worker-gpus 0,1 --kv-cache-bytes 0 --rates 2 4 8 \\
        --concurrencies 8 32 -- --input-len 1024 --output-len 128 --vocab-size 128256
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from local_stack import CONFIGS, PipelineProcess  # beside this script

from pagewire.bench.cli import main as bench

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONCURRENCY_SUFFIX = "-concurrency"
CONCURRENCY_SEED = 1000  # the rate sweep's points take seeds 0, 1, 2, ...
WARMUP_SEED = 2000


def main() -> int:
    # A SIGTERM (`timeout`) unwinds like Ctrl-C, so the running stack is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = parse_args(argv[:split]), argv[split + 1:]
    result_dir = Path(args.result_dir or RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}"
                      "-serving-sweep")
    failed = []
    for name in args.configs:
        if not run_config(name, args, bench_args, result_dir):
            failed.append(name)
    code = 1 if failed else 0
    done = [name for name in args.configs if (result_dir / name).is_dir()]
    if done:
        code |= bench(["sweep", "--compare", *(str(result_dir / name) for name in done),
                       "--label", "-vs-".join(done), "--result-dir", str(result_dir)])
    swept = [name for name in done if (result_dir / f"{name}{CONCURRENCY_SUFFIX}").is_dir()]
    if swept:
        code |= bench(["sweep", "--compare",
                       *(str(result_dir / f"{name}{CONCURRENCY_SUFFIX}") for name in swept),
                       "--label", "-vs-".join(swept) + CONCURRENCY_SUFFIX,
                       "--result-dir", str(result_dir)])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return code


def run_config(name: str, args: argparse.Namespace, bench_args: list[str],
               result_dir: Path) -> bool:
    """One deployment: up, the rate sweep, the concurrency sweep, down. False if any failed;
    a deployment that fails never stops the next one from running."""
    started = time.monotonic()
    stack = PipelineProcess(name, args.kv_cache_bytes or None, args.model, args.verbose,
                            up_flags(args))
    ok = True
    try:
        stack.wait_ready()
        print(f"== {name}: {stack.command} (up in {time.monotonic() - started:.0f} s)",
              flush=True)
        if args.warmup_prompts:
            warm_up(stack.url, name, args.warmup_prompts, bench_args)
        sweep = ["sweep", "--base-url", stack.url, "--label", name, "--server-metrics"]
        if args.rates:
            ok &= bench([*sweep, "--rates", *args.rates, "--result-dir",
                         str(result_dir / name), *bench_args]) == 0
        if args.concurrencies:  # other prompts than the rates': none is a prefix-cache hit
            ok &= bench([*sweep, "--concurrencies", *args.concurrencies, "--seed",
                         str(CONCURRENCY_SEED), "--result-dir",
                         str(result_dir / f"{name}{CONCURRENCY_SUFFIX}"), *bench_args]) == 0
    except RuntimeError as exc:
        print(f"== {name} failed: {exc}", file=sys.stderr, flush=True)
        ok = False
    finally:
        stack.stop()
    return ok


def warm_up(url: str, name: str, num_prompts: int, bench_args: list[str]) -> None:
    """All at once, not recorded: compiles kernels and captures the CUDA graphs of the batch
    sizes the sweeps will reach, so the first point does not pay for them."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        bench(["serve", "--base-url", url, "--label", f"{name}-warm-up", *bench_args,
               "--num-prompts", str(num_prompts), "--request-rate", "inf",
               "--seed", str(WARMUP_SEED), "--no-plots", "--result-dir", scratch])
    print(f"== {name}: warmed up with {num_prompts} requests in "
          f"{time.monotonic() - started:.0f} s", flush=True)


def up_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for flag, value in (("--load-format", args.load_format),
                        ("--max-model-len", args.max_model_len),
                        ("--worker-gpus", args.worker_gpus),
                        ("--kv-transports", args.kv_transports)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS),
                        default=["disagg", "colocated"])
    parser.add_argument("--rates", nargs="+", default=["1", "2", "4", "inf"],
                        help="request rates (inf: all at once); 'none' to skip")
    parser.add_argument("--concurrencies", nargs="+", default=None,
                        help="then a sweep over these concurrency caps (all sent at once, "
                             "at most N in flight)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--load-format", default=None,
                        help="workers' weights (dummy: random, with --model a config "
                             "directory, see bench_model.py)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-transports", default=None,
                        help="KV transports the workers may use (pagewire up --kv-transports)")
    parser.add_argument("--worker-gpus", default=None, metavar="0,1",
                        help="pin worker i to GPU i mod N (pagewire up --worker-gpus)")
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20,
                        help="KV cache of each worker; 0: the workers' default (on a GPU: "
                             "what 90%% of its memory leaves)")
    parser.add_argument("--warmup-prompts", type=int, default=0,
                        help="requests sent at once to each deployment before its sweeps, "
                             "not recorded (GPU: kernels compile, CUDA graphs get captured)")
    parser.add_argument("--result-dir", default=None,
                        help="default: loadtests/results/DATE-serving-sweep (one folder per "
                             "configuration and sweep, the joint plots at the top)")
    parser.add_argument("--verbose", action="store_true", help="echo the services' output")
    args = parser.parse_args(argv)
    if args.rates == ["none"]:
        args.rates = []
    return args


if __name__ == "__main__":
    sys.exit(main())
