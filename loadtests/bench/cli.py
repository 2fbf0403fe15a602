"""`pagewire bench serve` and `pagewire bench sweep`: the command line of the serving benchmark.

    pagewire bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4 \\
        --goodput ttft:500 tpot:50
    pagewire bench sweep --rates 1 2 4 8 inf --label disagg --result-dir results/
    pagewire bench sweep --compare results/disagg-sweep.json results/colocated/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import httpx

from .config import DATASETS, PROMPT_FORMATS, BenchConfig, DatasetConfig, LoadConfig, parse_goodput
from .plots import MISSING_MESSAGE, plot_latency_cdfs, plot_sweep, plots_available
from .report import format_table, rate_label, result_filename, safe_name, write_json
from .serve import run_benchmark
from .sweep import load_curves, run_sweep, summary_path, sweep_axis, sweep_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagewire bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_parser()
    serve = commands.add_parser("serve", parents=[common], help="one run at one request rate")
    serve.add_argument("--request-rate", type=float, default=float("inf"),
                       help="mean requests per second (conversations for multi-turn); "
                            "inf (default): all at once")
    serve.add_argument("--result-filename", default=None,
                       help="default: LABEL-rate-R.json in --result-dir")
    serve.set_defaults(func=_serve)
    sweep = commands.add_parser("sweep", parents=[common],
                                help="several request rates, then throughput/latency curves")
    sweep.add_argument("--rates", type=float, nargs="+", default=None,
                       help="request rates to run, in order (inf: all at once)")
    sweep.add_argument("--concurrencies", type=int, nargs="+", default=None,
                       help="instead of rates: concurrency caps to run, in order, each at "
                            "--request-rate")
    sweep.add_argument("--request-rate", type=float, default=float("inf"),
                       help="with --concurrencies: the rate of every point (default: inf)")
    sweep.add_argument("--compare", type=Path, nargs="+", default=[],
                       help="other deployments' sweep summaries, results or directories, "
                            "drawn on the same plot (alone: only draw them)")
    sweep.set_defaults(func=_sweep)
    return parser


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the OpenAI-compatible server (with or without /v1)")
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--label", default=None, help="names this deployment (default: host_port)")
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", "--dataset", choices=DATASETS, default="random")
    data.add_argument("--num-prompts", type=int, default=100,
                      help="requests; conversations for multi-turn")
    data.add_argument("--input-len", "--random-input-len", type=int, default=1024,
                      help="prompt tokens (random); question / user-message words (chat sets)")
    data.add_argument("--output-len", "--random-output-len", type=int, default=128)
    data.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [len*(1-r), len*(1+r)]")
    data.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="ids",
                      help="random: token-id prompts (exact lengths) or text")
    data.add_argument("--vocab-size", type=int, default=32000,
                      help="random ids are drawn below this")
    data.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: system prompts")
    data.add_argument("--prefix-len", type=int, default=512,
                      help="shared-prefix: words per system prompt")
    data.add_argument("--turns", type=int, default=3, help="multi-turn: turns per conversation")
    data.add_argument("--seed", type=int, default=0)
    load = p.add_argument_group("load")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of arrival gaps (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, default=None)
    out = p.add_argument_group("requests and results")
    out.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="ask for exactly the sampled output length")
    out.add_argument("--temperature", type=float, default=0.0)
    out.add_argument("--extra-body", type=_json_object, default={},
                     help="JSON object merged into every request")
    out.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                     help="SLOs for goodput: ttft, tpot, e2el in milliseconds")
    out.add_argument("--metric-percentiles", default="90,99", help="comma-separated")
    out.add_argument("--num-warmups", type=int, default=1)
    out.add_argument("--request-timeout-s", type=float, default=600.0)
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    out.add_argument("--result-dir", type=Path, default=Path("."))
    out.add_argument("--no-plots", action="store_true", help="JSON only")
    out.add_argument("--server-metrics", action="store_true",
                     help="also record what the server's /metrics counters gained during the "
                          "run (pagewire: KV transfer seconds and bytes)")
    return p


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    dataset = DatasetConfig(
        name=args.dataset_name, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio,
        prompt_format=args.prompt_format, vocab_size=args.vocab_size,
        num_prefixes=args.num_prefixes, prefix_len=args.prefix_len, turns=args.turns,
        seed=args.seed)
    load = LoadConfig(request_rate=getattr(args, "request_rate", float("inf")),
                      burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                      seed=args.seed)
    label = args.label or safe_name(httpx.URL(args.base_url).netloc.decode())
    return BenchConfig(
        base_url=args.base_url, dataset=dataset, load=load, model=args.model,
        api_key=args.api_key, ignore_eos=args.ignore_eos, temperature=args.temperature,
        extra_body=args.extra_body, goodput_slos_ms=parse_goodput(args.goodput),
        percentiles=tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip()),
        num_warmups=args.num_warmups, request_timeout_s=args.request_timeout_s, label=label,
        show_progress=not args.disable_tqdm, server_metrics=args.server_metrics)


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = asyncio.run(run_benchmark(config))
    name = args.result_filename or result_filename(config.label, result["request_rate"],
                                                   result["max_concurrency"])
    path = write_json(args.result_dir / name, result)
    _print_result(result, path)
    if _can_plot(args):
        _plotted(plot_latency_cdfs({config.label: result["requests"]}, path.with_suffix(".png"),
                                   _title(result)))
    return 0 if result["metrics"]["completed"] else 1


def _sweep(args: argparse.Namespace) -> int:
    if not args.rates and not args.concurrencies and not args.compare:
        raise ValueError("sweep needs --rates or --concurrencies to run, --compare to draw, "
                         "or both")
    plots = _can_plot(args)
    curves, code, name = {}, 0, safe_name(args.label or "compare")
    if args.rates or args.concurrencies:
        config = config_from_args(args)
        name = safe_name(config.label)
        points = sweep_points(config, args.rates, args.concurrencies)
        summary, results = asyncio.run(run_sweep(config, points, args.result_dir,
                                                 _print_result))
        print(f"wrote {summary_path(args.result_dir, config.label)}")
        curves[config.label] = summary["runs"]
        code = 0 if all(r["metrics"]["completed"] for r in results) else 1
        if plots:
            by_point = {_point_label(r, bool(args.concurrencies)): r["requests"]
                        for r in results}
            _plotted(plot_latency_cdfs(by_point, args.result_dir / f"{name}-sweep-cdf.png",
                                       _title(results[0])))
    for label, rows in load_curves(args.compare).items() if args.compare else ():
        curves[label if label not in curves else f"{label} (compared)"] = rows
    if plots:
        x = sweep_axis([row for rows in curves.values() for row in rows])
        against = "concurrency" if x == "max_concurrency" else "request rate"
        _plotted(plot_sweep(curves, args.result_dir / f"{name}-sweep.png",
                            f"throughput, goodput and p90 latency against {against}", x))
    return code


def _point_label(result: dict, by_concurrency: bool) -> str:
    if by_concurrency:
        return f"concurrency {result['max_concurrency']}"
    return f"rate {rate_label(result['request_rate'])}"


def _print_result(result: dict, path: Path) -> None:
    print(f"\n{format_table(result)}")
    print(f"wrote {path}")


def _can_plot(args: argparse.Namespace) -> bool:
    if args.no_plots:
        return False
    if not plots_available():
        print(MISSING_MESSAGE)
        return False
    return True


def _plotted(path: Path) -> None:
    print(f"wrote {path}")


def _title(result: dict) -> str:
    dataset = result["config"]["dataset"]
    return (f"{result['label']}: {result['model']}, {dataset['name']} "
            f"(in {dataset['input_len']}, out {dataset['output_len']})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagewire bench: error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"pagewire bench: {args.base_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"pagewire bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pagewire bench: interrupted; nothing written for the unfinished run",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
