"""The soak's verdict (`loadtests/soak.py`): pure functions over what it recorded, no network.

A soak passes when every request ended with an outcome (completed, failed with a reason the
server gave, or disconnected on purpose by the client), few failed, no process grew or died, the
latency percentiles of its last window are within a factor of its first, and once drained every
worker's KV blocks are all free again. Times are seconds since the soak phase began (requests of
the capacity burst before it have negative start times and count only in the outcome checks).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

STATUSES = ("completed", "failed", "disconnected", "lost")
LATENCIES = ("ttft", "tpot", "e2e")
MB = 1 << 20


@dataclass
class Outcome:
    """One request the soak sent, and how it ended."""

    phase: str
    """capacity | soak."""
    mode: str
    """stream | non-stream | disconnect (streamed, closed by the client after a few chunks)."""
    dataset: str
    start_s: float
    status: str = "pending"
    """completed | failed (the server said why) | disconnected | lost (no final outcome)."""
    reason: str = ""
    finish_reason: str | None = None
    ttft_s: float | None = None
    """Streamed requests only."""
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0


@dataclass(frozen=True)
class Thresholds:
    max_lost: int = 0
    """Requests without a final outcome."""
    max_failed_fraction: float = 0.01
    """Requests that failed with a reason, over all sent."""
    max_rss_growth_fraction: float = 0.10
    max_rss_growth_mb: float = 50.0
    """A process fails only when it grew by more than both."""
    max_p90_ratio: float = 2.0
    """p90 of the last window over p90 of the first, per latency."""
    max_leaked_blocks: int = 0
    min_window_samples: int = 5
    """Fewer completed requests in a window: the latency check is skipped, not passed."""

    def __post_init__(self) -> None:
        if self.max_lost < 0 or self.max_leaked_blocks < 0 or self.min_window_samples < 1:
            raise ValueError("max_lost and max_leaked_blocks must be >= 0, "
                             "min_window_samples >= 1")
        if not 0 <= self.max_failed_fraction <= 1:
            raise ValueError("max_failed_fraction must be in [0, 1]")
        if self.max_rss_growth_fraction < 0 or self.max_rss_growth_mb < 0:
            raise ValueError("RSS growth limits must be >= 0")
        if not self.max_p90_ratio >= 1:
            raise ValueError("max_p90_ratio must be at least 1")


@dataclass(frozen=True)
class Windows:
    """The soak's time axis: the warm-up left out, then the first and last windows compared."""

    duration_s: float
    window_s: float
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.warmup_s < 0:
            raise ValueError("window_s must be above 0 and warmup_s at least 0")
        if self.warmup_s + 2 * self.window_s > self.duration_s + 1e-9:
            raise ValueError(f"a {self.duration_s:g} s soak cannot hold a {self.warmup_s:g} s "
                             f"warm-up and two {self.window_s:g} s windows")

    @classmethod
    def default(cls, duration_s: float, window_s: float | None = None,
                warmup_s: float = 0.0) -> Windows:
        """Minutes when the soak is long enough, else a third of what the warm-up leaves."""
        if window_s is None:
            window_s = min(60.0, (duration_s - warmup_s) / 3)
        return cls(duration_s, window_s, warmup_s)

    @property
    def first(self) -> tuple[float, float]:
        return self.warmup_s, self.warmup_s + self.window_s

    @property
    def last(self) -> tuple[float, float]:
        return self.duration_s - self.window_s, self.duration_s

    def buckets(self) -> list[tuple[float, float]]:
        """The table's rows: consecutive windows from 0; a short tail joins the last row."""
        count = max(1, math.floor(self.duration_s / self.window_s + 1e-9))
        edges = [i * self.window_s for i in range(count)] + [self.duration_s]
        return list(zip(edges, edges[1:]))


@dataclass
class Check:
    name: str
    ok: bool | None
    """None: skipped (not enough data), which fails nothing."""
    detail: str
    values: dict = field(default_factory=dict)


# ---- statistics ------------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), p)) if len(values) else None


def latencies_s(outcomes: Iterable[Outcome], name: str, start_s: float,
                end_s: float) -> list[float]:
    """One latency of the soak's completed requests sent in [start_s, end_s)."""
    values = [getattr(o, f"{name}_s") for o in outcomes
              if o.phase == "soak" and o.status == "completed" and start_s <= o.start_s < end_s]
    return [v for v in values if v is not None]


def status_counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = Counter(o.status for o in outcomes)
    return {status: counts.get(status, 0) for status in (*STATUSES, "pending") if
            status != "pending" or counts.get(status)}


def reasons(outcomes: Iterable[Outcome], status: str) -> dict[str, int]:
    return dict(Counter(o.reason for o in outcomes if o.status == status).most_common())


def window_table(outcomes: Sequence[Outcome], windows: Windows) -> list[dict]:
    """Per window: requests sent and how they ended, p50/p90 of each latency in ms."""
    rows = []
    for start_s, end_s in windows.buckets():
        sent = [o for o in outcomes if o.phase == "soak" and start_s <= o.start_s < end_s]
        row = {"start_s": start_s, "end_s": end_s, "sent": len(sent), **status_counts(sent)}
        for name in LATENCIES:
            values = latencies_s(sent, name, start_s, end_s)
            for p in (50, 90):
                value = percentile(values, p)
                row[f"{name}_p{p}_ms"] = None if value is None else value * 1000
        rows.append(row)
    return rows


def window_median(series: Sequence[Sequence[float]], start_s: float,
                  end_s: float) -> float | None:
    """Median value of (t, value) samples with t in [start_s, end_s]."""
    values = [value for t, value in series if start_s <= t <= end_s]
    return float(np.median(values)) if values else None


def slope_per_minute(series: Sequence[Sequence[float]], start_s: float) -> float | None:
    """Least-squares growth per minute of the samples from start_s on."""
    points = [(t, value) for t, value in series if t >= start_s]
    if len(points) < 3:
        return None
    t, values = np.asarray(points, dtype=float).T
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, values, 1)[0] * 60)


# ---- checks ----------------------------------------------------------------------------------

def check_outcomes(outcomes: Sequence[Outcome], thresholds: Thresholds) -> list[Check]:
    counts = status_counts(outcomes)
    lost = counts["lost"] + counts.get("pending", 0)
    lost_reasons = reasons(outcomes, "lost")
    sent = len(outcomes)
    failed_fraction = counts["failed"] / sent if sent else 0.0
    return [
        Check("every request has an outcome", sent > 0 and lost <= thresholds.max_lost,
              f"{sent} sent, {lost} without a final outcome" +
              (f": {_top(lost_reasons)}" if lost_reasons else ""),
              {"sent": sent, "lost": lost, "lost_reasons": lost_reasons}),
        Check("few failures", failed_fraction <= thresholds.max_failed_fraction,
              f"{counts['failed']} failed ({failed_fraction:.1%}, at most "
              f"{thresholds.max_failed_fraction:.1%})" +
              (f": {_top(reasons(outcomes, 'failed'))}" if counts["failed"] else ""),
              {"failed": counts["failed"], "failed_fraction": failed_fraction}),
    ]


def check_latency(outcomes: Sequence[Outcome], windows: Windows,
                  thresholds: Thresholds) -> list[Check]:
    checks = []
    for name in LATENCIES:
        first = latencies_s(outcomes, name, *windows.first)
        last = latencies_s(outcomes, name, *windows.last)
        title = f"{name.upper()} p90 stable"
        if min(len(first), len(last)) < thresholds.min_window_samples:
            checks.append(Check(title, None, f"skipped: {len(first)} and {len(last)} samples "
                                f"(fewer than {thresholds.min_window_samples})"))
            continue
        p90_first, p90_last = percentile(first, 90), percentile(last, 90)
        ratio = p90_last / p90_first if p90_first > 0 else math.inf
        checks.append(Check(
            title, ratio <= thresholds.max_p90_ratio,
            f"first {p90_first * 1000:.0f} ms, last {p90_last * 1000:.0f} ms "
            f"(x{ratio:.2f}, at most x{thresholds.max_p90_ratio:g})",
            {"first_p90_ms": p90_first * 1000, "last_p90_ms": p90_last * 1000,
             "ratio": ratio, "samples": [len(first), len(last)]}))
    return checks


def memory_growth(rss_series: dict[str, Sequence[Sequence[float]]],
                  windows: Windows) -> dict[str, dict]:
    """Per process: median RSS (bytes) in the first and last windows, growth, slope."""
    growth = {}
    for name, series in rss_series.items():
        first = window_median(series, *windows.first)
        last = window_median(series, *windows.last)
        grown = None if first is None or last is None else last - first
        growth[name] = {"first_bytes": first, "last_bytes": last, "growth_bytes": grown,
                        "growth_fraction": grown / first if grown is not None and first else
                        None, "slope_bytes_per_min": slope_per_minute(series, windows.warmup_s)}
    return growth


def check_memory(rss_series: dict[str, Sequence[Sequence[float]]], windows: Windows,
                 thresholds: Thresholds) -> list[Check]:
    if not rss_series:
        return [Check("memory flat", None, "skipped: no process was sampled")]
    growth = memory_growth(rss_series, windows)
    grew, unmeasured = [], []
    for name, g in growth.items():
        if g["growth_bytes"] is None:
            unmeasured.append(name)
        elif (g["growth_bytes"] > thresholds.max_rss_growth_mb * MB and
              g["growth_fraction"] > thresholds.max_rss_growth_fraction):
            grew.append(f"{name} +{g['growth_bytes'] / MB:.0f} MB "
                        f"({g['growth_fraction']:+.0%})")
    largest = max((g for g in growth.values() if g["growth_bytes"] is not None),
                  key=lambda g: g["growth_bytes"], default=None)
    detail = ("; ".join(grew) if grew else
              f"{len(growth) - len(unmeasured)} processes, largest growth "
              f"{(largest or {}).get('growth_bytes', 0) / MB:+.1f} MB")
    if unmeasured:
        detail += f"; not sampled in both windows: {', '.join(unmeasured)}"
    return [Check("memory flat", not grew and not unmeasured, detail,
                  {"processes": growth})]


def check_processes(alive: dict[str, bool]) -> list[Check]:
    if not alive:
        return [Check("every process alive", None, "skipped: no process was sampled")]
    dead = [name for name, ok in alive.items() if not ok]
    return [Check("every process alive", not dead,
                  f"exited: {', '.join(dead)}" if dead else f"{len(alive)} processes")]


def check_kv(final_workers: Sequence[dict] | None, expected_workers: int,
             thresholds: Thresholds) -> list[Check]:
    """After draining: every worker in /cluster holds all its blocks free, runs nothing."""
    if final_workers is None:
        return [Check("no KV block leaked", False, "/cluster could not be read after draining")]
    leaked = sum(w["kv_blocks_total"] - w["kv_blocks_free"] for w in final_workers)
    busy = sum(w["running"] + w["waiting"] for w in final_workers)
    ok = (leaked <= thresholds.max_leaked_blocks and busy == 0 and
          len(final_workers) == expected_workers)
    detail = (f"{len(final_workers)} of {expected_workers} workers, {leaked} blocks not free, "
              f"{busy} requests running or waiting")
    return [Check("no KV block leaked", ok, detail,
                  {"leaked_blocks": leaked, "busy": busy, "workers": list(final_workers)})]


def evaluate(outcomes: Sequence[Outcome], windows: Windows, thresholds: Thresholds, *,
             rss_series: dict[str, Sequence[Sequence[float]]],
             alive: dict[str, bool], final_workers: Sequence[dict] | None,
             expected_workers: int) -> list[Check]:
    return [*check_outcomes(outcomes, thresholds), *check_latency(outcomes, windows, thresholds),
            *check_memory(rss_series, windows, thresholds), *check_processes(alive),
            *check_kv(final_workers, expected_workers, thresholds)]


def passed(checks: Sequence[Check]) -> bool:
    return all(check.ok is not False for check in checks)


def _top(counts: dict[str, int], limit: int = 3) -> str:
    shown = [f"{count} x {reason or '(no reason)'}" for reason, count in
             list(counts.items())[:limit]]
    more = len(counts) - limit
    return "; ".join(shown) + (f"; and {more} more reasons" if more > 0 else "")
