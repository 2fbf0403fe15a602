"""A bounded soak: the whole stack under steady load for a while, then proof that nothing was
lost, leaked or grew (issue 6, "Load").

It starts `pagewire up` on the embedded model (1 prefill + 1 decode worker; `--colocated`: one
worker doing both), or attaches to a running one with --base-url. It measures capacity with a
closed-loop burst (--capacity-concurrency requests in flight for --capacity-s; or takes
--capacity-rps), then sends Poisson arrivals at --load-fraction of it for --duration-s: random
token-id completions and shared-prefix chats, most streamed, some not, a few closed by the
client mid-stream. Every --sample-interval-s it records each stack process's RSS and the
gateway's /cluster. After draining it checks (loadtests/bench/soak_checks.py): every request
has a final outcome, few failed, every process is alive and its RSS flat (first window against
last), the latency p90s of the last window within --max-p90-ratio of the first, and every
worker's KV blocks all free. A table on stdout, JSON and a PNG in --result-dir; exit 1 if a
check failed, 2 if the soak could not run.

    python loadtests/soak.py                                      # 10 minutes at 0.8 x capacity
    python loadtests/soak.py --colocated --duration-s 120 --capacity-s 20
    python loadtests/soak.py --base-url http://127.0.0.1:8000 --capacity-rps 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from local_stack import CONFIGS, PipelineProcess  # beside this script

from pagewire.bench.client import first_model, new_client
from pagewire.bench.plots import MISSING_MESSAGE, plots_available
from pagewire.bench.report import safe_name, write_json
from pagewire.bench.server_metrics import counter_deltas, scrape
from pagewire.bench.soak_checks import (
    Thresholds,
    Windows,
    evaluate,
    memory_growth,
    passed,
    reasons,
    status_counts,
    window_table,
)
from pagewire.bench.soak_report import format_report, plot_soak
from pagewire.bench.soak_samplers import (
    Recorder,
    find_launcher,
    read_cluster,
    wait_until_idle,
)
from pagewire.bench.soak_traffic import (
    MixConfig,
    RequestMix,
    Sender,
    drain,
    measure_capacity,
    rebase,
    send_poisson,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CAPACITY_SEED_OFFSET = 1_000_003  # the burst's prompts share nothing with the soak's


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args(argv)
    try:
        thresholds = thresholds_from(args)
        windows = Windows.default(args.duration_s, args.window_s, args.warmup_s)
        mix = mix_from(args)
    except ValueError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    stack = None
    try:
        if args.base_url:
            base_url, label = args.base_url, "attached"
            root_pid = args.up_pid or find_launcher(httpx.URL(base_url).port or 80)
            if root_pid is None:
                print("soak: no `pagewire up` of that port runs here: memory not sampled "
                      "(--up-pid names one)", flush=True)
        else:
            started = time.monotonic()
            stack = PipelineProcess(args.config, args.kv_cache_bytes or None, args.model,
                                    args.verbose, up_flags(args))
            stack.wait_ready()
            base_url, label, root_pid = stack.url, args.config, stack.pid
            print(f"soak: {stack.command} up in {time.monotonic() - started:.0f} s", flush=True)
        record = asyncio.run(soak(base_url, root_pid, label, args, windows, thresholds, mix))
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"soak: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            stack.stop()
    return report(record, args)


async def soak(base_url: str, root_pid: int | None, label: str, args: argparse.Namespace,
               windows: Windows, thresholds: Thresholds, mix: MixConfig) -> dict:
    root_url = base_url.rstrip("/").removesuffix("/v1")
    async with new_client(root_url, args.api_key, args.request_timeout_s) as client:
        model = await first_model(client)
        start_cluster = await read_cluster(client)
        if "workers" not in start_cluster:
            raise RuntimeError(f"/cluster: {start_cluster['error']}")
        expected_workers = len(start_cluster["workers"])
        recorder = Recorder(client, root_pid, args.sample_interval_s)
        sender = Sender(client, model, mix, args.request_timeout_s)
        before = await scrape(client)
        sampling = asyncio.create_task(recorder.run())
        try:
            capacity = await find_capacity(sender, mix, args)
            rate = capacity["capacity_rps"] * args.load_fraction
            print(f"soak: capacity {capacity['capacity_rps']:.2f} req/s ({capacity['how']}); "
                  f"{args.duration_s:g} s of arrivals at {rate:.2f} req/s", flush=True)
            origin = time.monotonic()
            progress = asyncio.create_task(show_progress(sender, recorder, origin, args))
            tasks = await send_poisson(sender, RequestMix(mix), rate, args.duration_s,
                                       args.burstiness, args.seed)
            print(f"soak: arrivals done, draining {sender.in_flight()} requests", flush=True)
            await drain(tasks, args.drain_timeout_s)
            progress.cancel()
            final_workers = await wait_until_idle(client, expected_workers, args.idle_timeout_s)
            alive = recorder.alive()
            after = await scrape(client)
        finally:
            recorder.stop()
            await sampling
    outcomes = rebase(sender.outcomes, origin)
    rss = {name: [[t - origin, value] for t, value in series]
           for name, series in recorder.rss.items()}
    checks = evaluate(outcomes, windows, thresholds, rss_series=rss, alive=alive,
                      final_workers=final_workers, expected_workers=expected_workers)
    soak_phase = [o for o in outcomes if o.phase == "soak"]
    return {
        "kind": "soak", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "stack": label,
        "base_url": base_url, "model": model, "config": _json_args(args),
        "thresholds": dataclasses.asdict(thresholds), "mix": dataclasses.asdict(mix),
        "windows": {"duration_s": windows.duration_s, "window_s": windows.window_s,
                    "warmup_s": windows.warmup_s, "first": windows.first,
                    "last": windows.last},
        "capacity": capacity, "rate_rps": rate, "soak_sent": len(soak_phase),
        "counts": status_counts(outcomes),
        "reasons": {status: reasons(outcomes, status) for status in ("failed", "lost")},
        "finish_reasons": dict(Counter(o.finish_reason for o in outcomes
                                       if o.status == "completed")),
        "per_window": window_table(outcomes, windows),
        "memory": memory_growth(rss, windows), "rss": rss,
        "processes_appeared": recorder.appeared,
        "cluster": [{**sample, "t": sample["t"] - origin} for sample in recorder.cluster],
        "final_workers": final_workers, "server_metrics": counter_deltas(before, after),
        "checks": [dataclasses.asdict(check) for check in checks], "passed": passed(checks),
        "requests": [dataclasses.asdict(o) for o in outcomes],
    }


async def find_capacity(sender: Sender, mix: MixConfig, args: argparse.Namespace) -> dict:
    if args.capacity_rps:
        return {"how": "given", "capacity_rps": args.capacity_rps}
    burst_mix = RequestMix(dataclasses.replace(mix, seed=mix.seed + CAPACITY_SEED_OFFSET))
    capacity = await measure_capacity(sender, burst_mix, args.capacity_concurrency,
                                      args.capacity_s)
    if not capacity["capacity_rps"] > 0:
        raise RuntimeError(f"the capacity burst completed nothing: {capacity}")
    capacity["how"] = (f"{args.capacity_s:g} s closed loop at concurrency "
                       f"{args.capacity_concurrency}")
    return capacity


async def show_progress(sender: Sender, recorder: Recorder, origin: float,
                        args: argparse.Namespace) -> None:
    while True:
        await asyncio.sleep(args.progress_every_s)
        soak_phase = [o for o in sender.outcomes if o.phase == "soak"]
        counts = status_counts(soak_phase)
        workers = (recorder.cluster[-1].get("workers") or []) if recorder.cluster else []
        used = sum(w["kv_blocks_total"] - w["kv_blocks_free"] for w in workers)
        total = sum(w["kv_blocks_total"] for w in workers) or 1
        rss = sum(series[-1][1] for series in recorder.rss.values() if series)
        print(f"  [{time.monotonic() - origin:5.0f} s] sent {len(soak_phase)}: "
              f"{counts['completed']} done, {counts['failed']} failed, "
              f"{counts['disconnected']} disconnected, {counts['lost']} lost, "
              f"{counts.get('pending', 0)} in flight; KV {used / total:.0%} used; "
              f"RSS {rss / (1 << 20):.0f} MB in all", flush=True)


def report(record: dict, args: argparse.Namespace) -> int:
    result_dir = args.result_dir or RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}-soak"
    path = write_json(result_dir / f"soak-{safe_name(args.label or record['stack'])}.json",
                      record)
    print(f"\n{format_report(record)}\nwrote {path}")
    if not args.no_plots:
        if plots_available():
            print(f"wrote {plot_soak(record, path.with_suffix('.png'))}")
        else:
            print(MISSING_MESSAGE)
    return 0 if record["passed"] else 1


def thresholds_from(args: argparse.Namespace) -> Thresholds:
    return Thresholds(max_lost=args.max_lost, max_failed_fraction=args.max_failed_fraction,
                      max_rss_growth_fraction=args.max_rss_growth_fraction,
                      max_rss_growth_mb=args.max_rss_growth_mb, max_p90_ratio=args.max_p90_ratio,
                      max_leaked_blocks=args.max_leaked_blocks,
                      min_window_samples=args.min_window_samples)


def mix_from(args: argparse.Namespace) -> MixConfig:
    return MixConfig(shared_prefix_fraction=args.shared_prefix_fraction,
                     non_stream_fraction=args.non_stream_fraction,
                     disconnect_fraction=args.disconnect_fraction, input_len=args.input_len,
                     output_len=args.output_len, range_ratio=args.range_ratio,
                     prefix_len=args.prefix_len, num_prefixes=args.num_prefixes, seed=args.seed)


def up_flags(args: argparse.Namespace) -> list[str]:
    return ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []


def _json_args(args: argparse.Namespace) -> dict:
    record = {key: (str(value) if isinstance(value, Path) else value)
              for key, value in vars(args).items()}
    record.pop("api_key", None)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    stack = parser.add_argument_group("the stack")
    stack.add_argument("--config", choices=sorted(CONFIGS), default="disagg",
                       help="which `pagewire up` to start (local_stack.CONFIGS)")
    stack.add_argument("--colocated", dest="config", action="store_const", const="colocated",
                       help="one worker doing prefill and decode (--config colocated)")
    stack.add_argument("--base-url", default=None, help="attach to this running stack instead")
    stack.add_argument("--up-pid", type=int, default=None,
                       help="with --base-url: the `pagewire up` whose processes to sample "
                            "(default: the one started with the URL's port)")
    stack.add_argument("--api-key", default=None)
    stack.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    stack.add_argument("--kv-cache-bytes", type=int, default=512 << 20,
                       help="per worker; 0: the workers' default")
    stack.add_argument("--max-model-len", type=int, default=None)
    stack.add_argument("--verbose", action="store_true", help="echo the services' output")
    load = parser.add_argument_group("load")
    load.add_argument("--duration-s", type=float, default=600.0, help="seconds of arrivals")
    load.add_argument("--load-fraction", type=float, default=0.8,
                      help="arrival rate as a fraction of capacity")
    load.add_argument("--capacity-rps", type=float, default=None,
                      help="skip the burst: the capacity in requests per second")
    load.add_argument("--capacity-concurrency", type=int, default=16)
    load.add_argument("--capacity-s", type=float, default=60.0, help="the burst's length")
    load.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson arrivals")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--request-timeout-s", type=float, default=120.0,
                      help="a request without a final outcome by then is lost")
    load.add_argument("--drain-timeout-s", type=float, default=150.0,
                      help="after the arrivals, how long to wait for requests in flight")
    load.add_argument("--idle-timeout-s", type=float, default=30.0,
                      help="after draining, how long the workers may take to free every block")
    mix = parser.add_argument_group("request mix")
    mix.add_argument("--shared-prefix-fraction", type=float, default=0.5)
    mix.add_argument("--non-stream-fraction", type=float, default=0.2)
    mix.add_argument("--disconnect-fraction", type=float, default=0.02)
    mix.add_argument("--input-len", type=int, default=128,
                     help="random prompts: tokens; shared-prefix: question words")
    mix.add_argument("--output-len", type=int, default=32)
    mix.add_argument("--range-ratio", type=float, default=0.5)
    mix.add_argument("--prefix-len", type=int, default=256)
    mix.add_argument("--num-prefixes", type=int, default=4)
    watch = parser.add_argument_group("sampling and checks")
    watch.add_argument("--sample-interval-s", type=float, default=5.0)
    watch.add_argument("--progress-every-s", type=float, default=30.0)
    watch.add_argument("--window-s", type=float, default=None,
                       help="compared windows and table rows (default: 60, or a third of a "
                            "shorter soak)")
    watch.add_argument("--warmup-s", type=float, default=0.0,
                       help="soak seconds before the first window (the burst warms up too)")
    watch.add_argument("--max-lost", type=int, default=0)
    watch.add_argument("--max-failed-fraction", type=float, default=0.01)
    watch.add_argument("--max-rss-growth-fraction", type=float, default=0.10)
    watch.add_argument("--max-rss-growth-mb", type=float, default=50.0,
                       help="a process fails when it grew more than this and the fraction")
    watch.add_argument("--max-p90-ratio", type=float, default=2.0)
    watch.add_argument("--max-leaked-blocks", type=int, default=0)
    watch.add_argument("--min-window-samples", type=int, default=5)
    out = parser.add_argument_group("results")
    out.add_argument("--result-dir", type=Path, default=None,
                     help="default: loadtests/results/DATE-soak")
    out.add_argument("--label", default=None, help="names the files (default: the config)")
    out.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.load_fraction <= 1.5 or args.capacity_concurrency < 1:
        parser.error("--load-fraction must be in (0, 1.5] and --capacity-concurrency >= 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
