"""The soak's result for people: a short table, and a PNG of latency, memory and KV over time
(matplotlib optional, as for the benchmark's plots)."""

from __future__ import annotations

from pathlib import Path

from .soak_checks import LATENCIES, MB

MARKS = {True: "PASS", False: "FAIL", None: "skip"}


def format_report(record: dict) -> str:
    counts, capacity = record["counts"], record["capacity"]
    lines = [
        f"soak: {record['model']} at {record['base_url']} ({record['stack']}), "
        f"{record['windows']['duration_s']:g} s at {record['rate_rps']:.2f} req/s "
        f"= {record['config']['load_fraction']:g} x capacity {capacity['capacity_rps']:.2f} "
        f"req/s ({capacity['how']})",
        "requests: " + ", ".join(f"{n} {status}" for status, n in counts.items()) +
        f" (capacity burst included; soak phase sent {record['soak_sent']})",
    ]
    for status in ("failed", "lost"):
        for reason, n in record["reasons"][status].items():
            lines.append(f"  {status} x{n}: {reason}")
    if record.get("server_metrics"):
        lines.append(_server_line(record["server_metrics"]))
    lines.append(_window_header())
    lines += [_window_row(row) for row in record["per_window"]]
    lines.append(f"{'process':<22}{'first MB':>10}{'last MB':>10}{'growth':>10}{'MB/min':>9}")
    for name, g in record["memory"].items():
        lines.append(f"{name:<22}{_mb(g['first_bytes']):>10}{_mb(g['last_bytes']):>10}"
                     f"{_mb(g['growth_bytes'], sign=True):>10}"
                     f"{_mb(g['slope_bytes_per_min'], sign=True, digits=2):>9}")
    lines += [f"[{MARKS[c['ok']]}] {c['name']}: {c['detail']}" for c in record["checks"]]
    lines.append("soak passed" if record["passed"] else "soak FAILED")
    return "\n".join(lines)


def _server_line(deltas: dict) -> str:
    """What the gateway counted: finish reasons (a disconnect is an abort) and failures."""
    ended = []
    for key, value in deltas.items():
        name, _, label = key.partition("{")
        if name == "pagewire:request_success_total":
            ended.append(f"{value:.0f} {label.split(chr(34))[1]}")
        elif name == "pagewire:request_failure_total":
            ended.append(f"{value:.0f} failed {label.split(chr(34))[1]}")
    return "server counted (per choice): " + (", ".join(ended) or "nothing")


def _window_header() -> str:
    latency = "".join(f"{name.upper() + ' p50/p90':>18}" for name in LATENCIES)
    return f"{'window (s)':<12}{'sent':>6}{'done':>6}{'fail':>6}{'disc':>6}{'lost':>6}{latency}"


def _window_row(row: dict) -> str:
    cells = f"{row['start_s']:>4.0f}-{row['end_s']:<7.0f}{row['sent']:>6}{row['completed']:>6}"
    cells += f"{row['failed']:>6}{row['disconnected']:>6}{row['lost'] + row.get('pending', 0):>6}"
    for name in LATENCIES:
        p50, p90 = row[f"{name}_p50_ms"], row[f"{name}_p90_ms"]
        cells += f"{'-' if p50 is None else f'{p50:.0f}/{p90:.0f} ms':>18}"
    return cells


def _mb(value: float | None, sign: bool = False, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value / MB:{'+' if sign else ''}.{digits}f}"


def plot_soak(record: dict, path: Path) -> Path:
    """Three panels against time: latency p50/p90 per window, RSS per process, KV in use."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    fig, (lat, mem, kv) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    rows = record["per_window"]
    middles = [(row["start_s"] + row["end_s"]) / 2 for row in rows]
    for name in LATENCIES:
        for p, style in ((50, "-"), (90, "--")):
            values = [row[f"{name}_p{p}_ms"] for row in rows]
            lat.plot(middles, values, style, marker="o", label=f"{name.upper()} p{p}")
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.legend(fontsize="small", ncol=3)
    for name, series in record["rss"].items():
        if series:
            t, rss = zip(*series)
            mem.plot(t, [value / MB for value in rss], label=name)
    mem.set_ylabel("RSS (MB)")
    mem.legend(fontsize="small")
    _plot_kv(kv, record["cluster"])
    for ax in (lat, mem, kv):
        ax.axvspan(*record["windows"]["first"], color="green", alpha=0.08)
        ax.axvspan(*record["windows"]["last"], color="red", alpha=0.08)
        ax.grid(alpha=0.3)
    kv.set_xlabel("seconds since the soak began (shaded: the windows compared)")
    return _save(plt, fig, path, f"soak: {record['stack']}, {record['rate_rps']:.2f} req/s")


def _plot_kv(ax, cluster: list[dict]) -> None:
    samples = [s for s in cluster if "workers" in s]
    by_worker: dict[str, list] = {}
    for sample in samples:
        for w in sample["workers"]:
            used = 1 - w["kv_blocks_free"] / w["kv_blocks_total"] if w["kv_blocks_total"] else 0
            by_worker.setdefault(w["id"], []).append(
                (sample["t"], used * 100, w["running"] + w["waiting"]))
    queue = ax.twinx()
    for label, points in by_worker.items():
        t, used, busy = zip(*points)
        ax.plot(t, used, label=f"{label} KV used")
        queue.plot(t, busy, ":", label=f"{label} running+waiting")
    ax.set_ylabel("KV blocks in use (%)")
    queue.set_ylabel("requests running + waiting")
    ax.legend(fontsize="small", loc="upper left")
    queue.legend(fontsize="small", loc="upper right")
