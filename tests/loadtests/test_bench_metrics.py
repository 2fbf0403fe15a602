"""The benchmark's metrics, as vLLM's `vllm bench serve` defines them, on known timings."""

from __future__ import annotations

import pytest

from pagewire.bench.client import RequestResult
from pagewire.bench.metrics import compute_metrics


def done(ttft_s, latency_s, output_tokens, itl_s=(), prompt_tokens=10, cached_tokens=0):
    return RequestResult(ok=True, ttft_s=ttft_s, latency_s=latency_s, itl_s=list(itl_s),
                         prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                         cached_tokens=cached_tokens)


RESULTS = [
    done(0.1, 1.0, 10, [0.1] * 9, cached_tokens=5),  # TPOT 0.1
    done(0.3, 0.5, 5, [0.05] * 4),                  # TPOT 0.05
    done(0.2, 0.2, 1),                              # one token: no TPOT, no ITL
    RequestResult(error="HTTP 500: boom"),
]


def test_throughput_counts_completed_requests_and_their_tokens():
    m = compute_metrics(RESULTS, duration_s=2.0, goodput_slos_ms={})
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(16 / 2)
    assert m["total_token_throughput"] == pytest.approx((30 + 16) / 2)
    assert m["prefix_cache_hit_rate"] == pytest.approx(5 / 30)
    assert m["request_goodput"] is None
    assert m["errors"] == {"HTTP 500: boom": 1}


def test_latencies_are_vllms_definitions_in_milliseconds():
    m = compute_metrics(RESULTS, duration_s=2.0, goodput_slos_ms={})
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(75.0)  # (100 + 50) / 2: the 1-token request out
    assert m["mean_itl_ms"] == pytest.approx((9 * 100 + 4 * 50) / 13)
    assert m["mean_e2el_ms"] == pytest.approx((1000 + 500 + 200) / 3)
    assert m["p99_e2el_ms"] == pytest.approx(990.0)  # numpy's linear interpolation, as vLLM
    assert m["p90_ttft_ms"] <= m["p99_ttft_ms"] <= 300.0


def test_goodput_counts_requests_meeting_every_slo():
    m = compute_metrics(RESULTS, duration_s=2.0, goodput_slos_ms={"ttft": 250, "tpot": 80})
    # first: TPOT 100 > 80; second: TTFT 300 > 250; third: TTFT 200, TPOT 0 -> good
    assert m["request_goodput"] == pytest.approx(0.5)
    m = compute_metrics(RESULTS, duration_s=2.0, goodput_slos_ms={"e2el": 600})
    assert m["request_goodput"] == pytest.approx(1.0)


def test_no_completed_request_leaves_latencies_empty_not_zero():
    m = compute_metrics([RequestResult(error="x")], duration_s=1.0, goodput_slos_ms={},
                        percentiles=(50.0, 99.9))
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and m["p99.9_itl_ms"] is None



def test_server_metrics_keep_counter_and_histogram_gains_only():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from pagewire.bench.server_metrics import counter_deltas, parse_counters

    registry = CollectorRegistry()
    seconds = Histogram("pagewire:kv_transfer_seconds", "", registry=registry)
    success = Counter("pagewire:request_success", "", ["finished_reason"], registry=registry)
    running = Gauge("pagewire:num_requests_running", "", registry=registry)
    seconds.observe(0.5)
    running.set(3)
    before = parse_counters(generate_latest(registry).decode())
    for value in (0.5, 1.0):
        seconds.observe(value)
        success.labels("length").inc()
    running.set(7)
    after = parse_counters(generate_latest(registry).decode())
    assert counter_deltas(before, after) == {
        "pagewire:kv_transfer_seconds_count": 2, "pagewire:kv_transfer_seconds_sum": 1.5,
        'pagewire:request_success_total{finished_reason="length"}': 1 + 1}
    assert counter_deltas(None, after) is None
