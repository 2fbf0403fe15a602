"""`pagewire bench sweep`: one deployment at a list of request rates, or of concurrency caps (a
result file per point and a summary), and the summaries of several deployments gathered for one
plot.

Each point gets its own prompts (the seeds move on by one per point), so a point never meets the
prefix cache that the one before it filled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from .config import BenchConfig
from .report import result_filename, safe_name, write_json
from .serve import run_benchmark

SUMMARY_SUFFIX = "-sweep.json"


def config_for_rate(config: BenchConfig, rate: float, index: int,
                    max_concurrency: int | None = None) -> BenchConfig:
    """The index-th point of a sweep: this rate (and concurrency cap, if given), new seeds."""
    load = dataclasses.replace(config.load, request_rate=rate, seed=config.load.seed + index)
    if max_concurrency is not None:
        load = dataclasses.replace(load, max_concurrency=max_concurrency)
    return dataclasses.replace(
        config, dataset=dataclasses.replace(config.dataset, seed=config.dataset.seed + index),
        load=load)


def sweep_points(config: BenchConfig, rates: list[float] | None,
                 concurrencies: list[int] | None) -> list[tuple[float, int | None]]:
    """(rate, concurrency cap) per point: the rates, or the caps at the configured rate."""
    if rates and concurrencies:
        raise ValueError("sweep either --rates or --concurrencies, not both")
    if concurrencies:
        return [(config.load.request_rate, c) for c in concurrencies]
    return [(rate, None) for rate in rates or []]


async def run_sweep(config: BenchConfig, points: list[tuple[float, int | None]],
                    result_dir: Path,
                    on_result: Callable[[dict, Path], None]) -> tuple[dict, list[dict]]:
    """Runs every (rate, concurrency cap) point in order; returns the summary (also written)
    and the full results."""
    results, rows = [], []
    for index, (rate, max_concurrency) in enumerate(points):
        result = await run_benchmark(config_for_rate(config, rate, index, max_concurrency))
        path = write_json(result_dir / result_filename(
            config.label, result["request_rate"], result["max_concurrency"]), result)
        on_result(result, path)
        results.append(result)
        rows.append({"request_rate": result["request_rate"],
                     "max_concurrency": result["max_concurrency"],
                     "result_file": path.name, "metrics": result["metrics"]})
    summary = {"kind": "sweep", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "label": config.label, "base_url": config.base_url, "x": sweep_axis(rows),
               "model": results[0]["model"], "config": results[0]["config"], "runs": rows}
    write_json(summary_path(result_dir, config.label), summary)
    return summary, results


def sweep_axis(rows: list[dict]) -> str:
    """What a sweep's rows vary: "max_concurrency" when every row has a cap and the caps
    differ, else "request_rate"."""
    caps = [row.get("max_concurrency") for row in rows]
    if all(caps) and len(set(caps)) > 1:
        return "max_concurrency"
    return "request_rate"


def summary_path(result_dir: Path, label: str) -> Path:
    return result_dir / f"{safe_name(label)}{SUMMARY_SUFFIX}"


def load_curves(paths: list[Path]) -> dict[str, list[dict]]:
    """Deployment label -> its rows, from sweep summaries, single results (`bench serve`
    files, grouped by label), or directories of either (their summaries if they hold any)."""
    curves: dict[str, list[dict]] = {}
    for path in _expand(paths):
        record = json.loads(path.read_text())
        if record.get("kind") == "sweep":
            label = record["label"] if record["label"] not in curves else f"{path.stem}"
            curves[label] = record["runs"]
        elif "metrics" in record and "request_rate" in record:
            curves.setdefault(record["label"], []).append(
                {"request_rate": record["request_rate"],
                 "max_concurrency": record.get("max_concurrency"), "metrics": record["metrics"]})
        else:
            raise ValueError(f"{path} is neither a sweep summary nor a benchmark result")
    if not curves:
        raise ValueError(f"no results in {', '.join(map(str, paths))}")
    return curves


def _expand(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            summaries = sorted(path.glob(f"*{SUMMARY_SUFFIX}"))
            files += summaries or sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return files
