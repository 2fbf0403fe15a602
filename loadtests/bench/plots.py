"""PNG plots of benchmark results: latency CDFs of one or more runs, and throughput and p90
latency against request rate for one or more deployments.

matplotlib is optional (`pip install 'pagewire[bench]'`): `plots_available()` says whether it
is installed, and nothing imports it before a plot is drawn.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .metrics import LATENCY_METRICS
from .report import LATENCY_NAMES, rate_label

MISSING_MESSAGE = "matplotlib is not installed: no plots (pip install 'pagewire[bench]')"


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def latency_samples_ms(requests: list[dict], name: str) -> list[float]:
    """One metric's samples from a result's request records, as the metrics count them."""
    done = [r for r in requests if r["ok"]]
    if name == "itl":
        seconds = [gap for r in done for gap in r["itl_s"]]
    elif name == "tpot":
        seconds = [r["tpot_s"] for r in done if r["output_tokens"] > 1]
    else:
        seconds = [r["ttft_s" if name == "ttft" else "latency_s"] for r in done]
    return [s * 1000 for s in seconds]


def plot_latency_cdfs(runs: dict[str, list[dict]], path: Path, title: str) -> Path:
    """runs: series label -> the result's "requests" records. One panel per latency."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, name in zip(axes.flat, LATENCY_METRICS):
        for label, requests in runs.items():
            values = np.sort(latency_samples_ms(requests, name))
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                        label=label)
        ax.set_xlabel(f"{LATENCY_NAMES[name]} (ms)")
        ax.set_ylabel("fraction of gaps" if name == "itl" else "fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    return _save(plt, fig, path, title)


def plot_sweep(curves: dict[str, list[dict]], path: Path, title: str,
               x: str = "request_rate") -> Path:
    """curves: deployment label -> sweep rows ({"request_rate", "max_concurrency", "metrics"}),
    one per point. Throughput (goodput dashed, where measured) and p90 latency (median if p90
    was not measured) against the request rate, or against the concurrency cap when x is
    "max_concurrency"."""
    plt = _pyplot()
    panels = [("request_throughput", "requests/s"), ("output_throughput", "output tokens/s")]
    panels += [(name, f"{LATENCY_NAMES[name]} (ms)") for name in LATENCY_METRICS]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    if x == "max_concurrency":
        position = lambda row: float(row["max_concurrency"])
        ticks = {f"{c:g}": c for c in sorted({position(r) for rs in curves.values() for r in rs})}
    else:
        ticks = _rate_positions([row["request_rate"] for rows in curves.values() for row in rows])
        position = lambda row: ticks[_rate_key(row["request_rate"])]
    for ax, (key, unit) in zip(axes.flat, panels):
        stat = ""
        for label, rows in curves.items():
            points = []
            for row in rows:
                value, row_stat = _value(row["metrics"], key)
                stat = row_stat or stat
                if value is not None:
                    points.append((position(row), value))
            if points:
                line, = ax.plot(*zip(*sorted(points)), marker="o", label=label)
                if key == "request_throughput":
                    _plot_goodput(ax, rows, position, line.get_color(), label)
        ax.set_title(f"{stat} {unit}".strip())
        ax.set_xlabel("concurrency (requests in flight)" if x == "max_concurrency"
                      else "request rate (req/s)")
        ax.set_xscale("log")
        ax.set_xticks(list(ticks.values()), list(ticks), minor=False)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    return _save(plt, fig, path, title)


def _plot_goodput(ax, rows: list[dict], position, color: str, label: str) -> None:
    points = [(position(row), row["metrics"]["request_goodput"]) for row in rows
              if row["metrics"].get("request_goodput") is not None]
    if points:
        ax.plot(*zip(*sorted(points)), marker="x", linestyle="--", color=color,
                label=f"{label} goodput")


def _value(metrics: dict, key: str) -> tuple[float | None, str]:
    """A throughput, or a latency's p90 (its median when p90 was not asked for)."""
    if key not in LATENCY_METRICS:
        return metrics.get(key), ""
    for stat in ("p90", "median"):
        if metrics.get(f"{stat}_{key}_ms") is not None:
            return metrics[f"{stat}_{key}_ms"], stat
    return None, ""


def _rate_positions(rates: list) -> dict[str, float]:
    """x position of each rate; "inf" (everything at once) sits one doubling past the largest."""
    keys = {_rate_key(rate) for rate in rates}
    finite = sorted(float(key) for key in keys if key != "inf")
    positions = {f"{rate:g}": rate for rate in finite}
    if "inf" in keys:
        positions["inf"] = 2 * finite[-1] if finite else 1.0
    return positions


def _rate_key(rate: float | str) -> str:
    return rate_label(rate)


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
