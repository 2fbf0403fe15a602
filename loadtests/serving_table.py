"""The table of a serving_sweep.py result folder, in Markdown: per deployment and point,
throughput, goodput under the given SLOs, TTFT and TPOT (median, p90), and the KV transfer
as the server counted it (transfers, mean push time, its share of the mean TTFT, GB/s).

Goodput is recomputed from every request's timings, so other SLOs than the run's can be read
off the same files.

    python loadtests/serving_table.py loadtests/results/2026-11-24-h200x2-serving \\
        --goodput ttft:1000 tpot:50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pagewire.bench.config import parse_goodput
from pagewire.bench.sweep import SUMMARY_SUFFIX

KV_SECONDS = "pagewire:kv_transfer_seconds"
KV_BYTES = "pagewire:kv_transfer_bytes_total"
TTFT_SECONDS = "pagewire:time_to_first_token_seconds"
COLUMNS = ["deployment", "rate", "concurrency", "done", "req/s", "goodput", "out tok/s",
           "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90", "KV pushes", "push mean",
           "push / TTFT", "push GB/s"]


def rows_of(result_dir: Path, slos_ms: dict[str, float]) -> list[list[str]]:
    rows = []
    for folder in sorted(p for p in result_dir.iterdir() if p.is_dir()):
        for result_file in result_files(folder):
            rows.append(row_of(folder.name, json.loads(result_file.read_text()), slos_ms))
    return rows


def result_files(folder: Path) -> list[Path]:
    """A sweep's points in its order; for a sweep cut off before its summary, the points that
    finished, in the order they were written."""
    summaries = sorted(folder.glob(f"*{SUMMARY_SUFFIX}"))
    if summaries:
        return [folder / run["result_file"]
                for summary in summaries for run in json.loads(summary.read_text())["runs"]]
    return sorted(folder.glob("*-rate-*.json"), key=lambda path: path.stat().st_mtime)


def row_of(deployment: str, result: dict, slos_ms: dict[str, float]) -> list[str]:
    m, requests = result["metrics"], [r for r in result["requests"] if r["ok"]]
    good = sum(all(_ms(r, name) <= slo for name, slo in slos_ms.items()) for r in requests)
    ttft = [r["ttft_s"] * 1000 for r in requests]
    tpot = [r["tpot_s"] * 1000 for r in requests if r["output_tokens"] > 1]
    server = result.get("server_metrics") or {}
    pushes = _summed(server, f"{KV_SECONDS}_count")
    push_s, ttft_count = _summed(server, f"{KV_SECONDS}_sum"), server.get(f"{TTFT_SECONDS}_count")
    mean_ttft_s = server.get(f"{TTFT_SECONDS}_sum", 0.0) / ttft_count if ttft_count else None
    mean_push_s = push_s / pushes if pushes else None
    return [
        deployment, str(result["request_rate"]), str(result["max_concurrency"] or "-"),
        f"{m['completed']}/{m['num_requests']}", f"{m['request_throughput']:.2f}",
        f"{good / m['duration_s']:.2f}", f"{m['output_throughput']:,.0f}",
        *(_pct(values, p) for values in (ttft, tpot) for p in (50, 90)),
        f"{pushes:.0f}", _ms_text(mean_push_s),
        f"{mean_push_s / mean_ttft_s:.0%}" if mean_push_s and mean_ttft_s else "-",
        f"{_summed(server, KV_BYTES) / push_s / 1e9:.2f}" if push_s else "-",
    ]


def _summed(server: dict[str, float], name: str) -> float:
    """A sample's value over all its labels (the KV counters have one per transport)."""
    return sum(v for k, v in server.items() if k == name or k.startswith(name + "{"))


def _ms(record: dict, name: str) -> float:
    return record[{"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "latency_s"}[name]] * 1000


def _pct(values: list[float], p: float) -> str:
    return f"{np.percentile(values, p):,.0f} ms" if values else "-"


def _ms_text(seconds: float | None) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds is not None else "-"


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result_dir", type=Path)
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS")
    args = parser.parse_args()
    slos = parse_goodput(args.goodput)
    print(f"goodput SLOs: {slos or 'none'}")
    print(markdown(rows_of(args.result_dir, slos)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
