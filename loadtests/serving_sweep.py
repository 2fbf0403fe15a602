"""Throughput and latency against request rate for local deployments, all on one plot.

Each configuration (local_stack.CONFIGS: disagg = 1 prefill + 1 decode worker, colocated = 1
worker doing both) is started with `pagewire up`, swept with `pagewire bench sweep` at the
given rates, and stopped before the next one starts, so no two stacks share the machine. Then
every configuration's curves are drawn together. Flags after `--` go to `pagewire bench sweep`.

    python loadtests/serving_sweep.py --configs disagg colocated --rates 0.5 1 2 inf \\
        -- --num-prompts 64 --input-len 256 --output-len 64 --goodput ttft:2000 tpot:300
    python loadtests/serving_sweep.py --rates 2 inf -- --num-prompts 4 --input-len 16 \\
        --output-len 4                                                    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from local_stack import CONFIGS, PipelineProcess  # beside this script

from pagewire.bench.cli import main as bench

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = parse_args(argv[:split]), argv[split + 1:]
    result_dir = Path(args.result_dir or RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}"
                      "-serving-sweep")
    for name in args.configs:
        stack = PipelineProcess(name, args.kv_cache_bytes, args.model, args.verbose)
        try:
            stack.wait_ready()
            print(f"== {name}: {stack.command}", flush=True)
            code = bench(["sweep", "--base-url", stack.url, "--label", name,
                          "--rates", *args.rates, "--result-dir", str(result_dir / name),
                          *bench_args])
        finally:
            stack.stop()
        if code:
            return code
    return bench(["sweep", "--compare", *(str(result_dir / name) for name in args.configs),
                  "--label", "-vs-".join(args.configs), "--result-dir", str(result_dir)])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS),
                        default=["disagg", "colocated"])
    parser.add_argument("--rates", nargs="+", default=["1", "2", "4", "inf"],
                        help="request rates (inf: all at once)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20,
                        help="KV cache of each worker")
    parser.add_argument("--result-dir", default=None,
                        help="default: loadtests/results/DATE-serving-sweep (one folder per "
                             "configuration, the joint plot at the top)")
    parser.add_argument("--verbose", action="store_true", help="echo the services' output")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
