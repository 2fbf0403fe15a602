"""The soak's verdict (pagewire.bench.soak_checks) on fabricated records: a healthy soak passes,
and each kind of trouble (a lost request, failures, memory growth, latency drift, a leaked
block, a dead process or worker) fails it, while a window too thin to judge is skipped."""

from __future__ import annotations

import pytest

from pagewire.bench.soak_checks import (
    MB,
    Outcome,
    Thresholds,
    Windows,
    evaluate,
    passed,
    window_table,
)

WINDOWS = Windows(duration_s=300, window_s=60)
DEFAULTS = Thresholds()
WORKERS = [{"id": "prefill@a", "role": "prefill", "running": 0, "waiting": 0,
            "kv_blocks_free": 100, "kv_blocks_total": 100},
           {"id": "decode@b", "role": "decode", "running": 0, "waiting": 0,
            "kv_blocks_free": 100, "kv_blocks_total": 100}]


def soak_outcomes(slow_after_s: float = float("inf"), factor: float = 1.0) -> list[Outcome]:
    """Two completed requests a second, latencies jittered; slower by `factor` from
    slow_after_s on."""
    outcomes = [Outcome("capacity", "stream", "random", -10.0, "completed", ttft_s=0.1,
                        tpot_s=0.02, e2e_s=0.5)]
    for i in range(600):
        t = i / 2
        scale = (factor if t >= slow_after_s else 1.0) * (1 + 0.1 * (i % 7))
        outcomes.append(Outcome("soak", "stream", "random", t, "completed", "", "length",
                                0.2 * scale, 0.03 * scale, 1.0 * scale, 32))
    return outcomes


def flat_rss(grow_bytes: float = 0.0) -> dict[str, list[list[float]]]:
    """Samples every 5 s; "decode worker" grows linearly by grow_bytes over the soak."""
    return {"gateway": [[t, 80 * MB] for t in range(0, 301, 5)],
            "decode worker": [[t, 2000 * MB + grow_bytes * t / 300] for t in range(0, 301, 5)]}


def verdict(outcomes=None, rss=None, alive=None, workers=WORKERS, expected=2,
            thresholds=DEFAULTS):
    checks = evaluate(soak_outcomes() if outcomes is None else outcomes, WINDOWS, thresholds,
                      rss_series=flat_rss() if rss is None else rss,
                      alive={"gateway": True, "decode worker": True} if alive is None else alive,
                      final_workers=workers, expected_workers=expected)
    return passed(checks), {check.name: check for check in checks}


def test_a_healthy_soak_passes_every_check():
    ok, checks = verdict()
    assert ok
    assert all(check.ok is True for check in checks.values()), checks


def test_a_request_without_final_outcome_fails():
    outcomes = soak_outcomes()
    outcomes[100].status, outcomes[100].reason = "lost", "the stream ended before [DONE]"
    outcomes[200].status = "pending"  # never finished at all
    ok, checks = verdict(outcomes)
    assert not ok
    check = checks["every request has an outcome"]
    assert check.ok is False and check.values["lost"] == 2
    assert "the stream ended before [DONE]" in check.detail


def test_disconnects_are_outcomes_and_few_failures_are_tolerated():
    outcomes = soak_outcomes()
    outcomes[5].status = "disconnected"
    outcomes[6].status, outcomes[6].reason = "failed", "HTTP 503: overloaded"
    ok, checks = verdict(outcomes)
    assert ok, checks
    assert "1 failed" in checks["few failures"].detail


def test_many_failures_fail_with_their_reasons():
    outcomes = soak_outcomes()
    for o in outcomes[1:21]:
        o.status, o.reason = "failed", "stream error: decode worker lost"
    ok, checks = verdict(outcomes)
    assert not ok
    assert checks["few failures"].ok is False
    assert "20 x stream error: decode worker lost" in checks["few failures"].detail


def test_memory_growth_past_both_limits_fails():
    ok, checks = verdict(rss=flat_rss(grow_bytes=400 * MB))
    assert not ok
    check = checks["memory flat"]
    assert check.ok is False and "decode worker" in check.detail
    growth = check.values["processes"]["decode worker"]
    assert growth["growth_bytes"] == pytest.approx(320 * MB, rel=0.05)
    assert growth["slope_bytes_per_min"] == pytest.approx(80 * MB, rel=0.01)


def test_growth_under_either_limit_passes():
    # +40 MB of 2 GB: under 50 MB and under 10%.
    assert verdict(rss=flat_rss(grow_bytes=50 * MB))[0]
    # A small process doubling by 30 MB: far over 10%, but under 50 MB.
    small = {"gateway": [[t, (30 + 30 * t / 300) * MB] for t in range(0, 301, 5)]}
    assert verdict(rss=small, alive={"gateway": True})[0]


def test_a_process_not_sampled_at_the_end_fails():
    rss = flat_rss()
    rss["decode worker"] = [s for s in rss["decode worker"] if s[0] < 100]
    ok, checks = verdict(rss=rss, alive={"gateway": True, "decode worker": False})
    assert not ok
    assert checks["every process alive"].ok is False
    assert "decode worker" in checks["every process alive"].detail
    assert checks["memory flat"].ok is False


def test_latency_drift_fails_and_names_the_latency():
    ok, checks = verdict(soak_outcomes(slow_after_s=200, factor=3.0))
    assert not ok
    for name in ("TTFT", "TPOT", "E2E"):
        check = checks[f"{name} p90 stable"]
        assert check.ok is False and check.values["ratio"] == pytest.approx(3.0, rel=0.01)


def test_drift_under_the_ratio_passes():
    assert verdict(soak_outcomes(slow_after_s=200, factor=1.5))[0]


def test_a_window_too_thin_to_judge_is_skipped_not_passed():
    outcomes = [o for o in soak_outcomes() if not 0 <= o.start_s < 58]  # 4 left in the first
    ok, checks = verdict(outcomes)
    assert ok
    assert checks["TTFT p90 stable"].ok is None
    assert "skipped" in checks["TTFT p90 stable"].detail


def test_leaked_blocks_or_leftover_requests_fail():
    leaked = [dict(WORKERS[0]), dict(WORKERS[1], kv_blocks_free=97)]
    ok, checks = verdict(workers=leaked)
    assert not ok and checks["no KV block leaked"].values["leaked_blocks"] == 3
    stuck = [dict(WORKERS[0], running=1), WORKERS[1]]
    assert not verdict(workers=stuck)[0]
    assert verdict(workers=leaked, thresholds=Thresholds(max_leaked_blocks=3))[0]


def test_a_vanished_worker_or_unreadable_cluster_fails():
    assert not verdict(workers=WORKERS[:1], expected=2)[0]
    ok, checks = verdict(workers=None)
    assert not ok and "could not be read" in checks["no KV block leaked"].detail


def test_window_table_counts_each_window():
    outcomes = soak_outcomes()
    outcomes[3].status = "disconnected"
    rows = window_table(outcomes, WINDOWS)
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(0, 60), (60, 120), (120, 180),
                                                          (180, 240), (240, 300)]
    assert rows[0]["sent"] == 120 and rows[0]["completed"] == 119
    assert rows[0]["disconnected"] == 1 and rows[0]["ttft_p50_ms"] > 0


def test_windows_default_to_minutes_or_a_third_of_a_short_soak():
    assert Windows.default(600).window_s == 60
    short = Windows.default(15, warmup_s=3)
    assert short.window_s == 4 and short.first == (3, 7) and short.last == (11, 15)
    with pytest.raises(ValueError, match="cannot hold"):
        Windows(duration_s=100, window_s=60)
