"""A run's result for people (a short table) and for files (JSON, names that say what ran)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .metrics import LATENCY_METRICS, percentile_key

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}


def rate_label(request_rate: float | str) -> str:
    """4.0 -> "4", inf or "inf" (as JSON holds it) -> "inf"."""
    return f"{float(request_rate):g}"


def result_filename(label: str, request_rate: float | str, max_concurrency: int | None) -> str:
    concurrency = f"-concurrency-{max_concurrency}" if max_concurrency else ""
    return f"{safe_name(label)}-rate-{rate_label(request_rate)}{concurrency}.json"


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def format_table(result: dict) -> str:
    metrics, config = result["metrics"], result["config"]
    concurrency = result["max_concurrency"] or "unlimited"
    lines = [
        f"{result['label']}: {result['model']} at {result['base_url']}, "
        f"rate {rate_label(result['request_rate'])}/s, concurrency {concurrency}, "
        f"dataset {config['dataset']['name']}",
        f"requests: {metrics['completed']} completed, {metrics['failed']} failed, "
        f"in {metrics['duration_s']:.2f} s",
        f"throughput: {metrics['request_throughput']:.2f} req/s, "
        f"{metrics['output_throughput']:.1f} output tok/s, "
        f"{metrics['total_token_throughput']:.1f} total tok/s",
    ]
    if metrics["request_goodput"] is not None:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in config["goodput_slos_ms"].items())
        lines.append(f"goodput: {metrics['request_goodput']:.2f} req/s ({slos})")
    if metrics["prefix_cache_hit_rate"]:
        lines.append(f"prefix cache: {metrics['prefix_cache_hit_rate']:.1%} of prompt tokens")
    columns = ["mean", "median", "std", *(percentile_key(p) for p in config["percentiles"])]
    lines.append(f"{'latency (ms)':<14}" + "".join(f"{c:>10}" for c in columns))
    for name in LATENCY_METRICS:
        values = [metrics[f"{column}_{name}_ms"] for column in columns]
        lines.append(f"{LATENCY_NAMES[name]:<14}" + "".join(
            f"{'-' if v is None else f'{v:.1f}':>10}" for v in values))
    for error, count in metrics["errors"].items():
        lines.append(f"error x{count}: {error}")
    return "\n".join(lines)
