"""A run's metrics from its requests' results, as vLLM's `vllm bench serve` defines them.

- TTFT: time to the first output chunk. TPOT: (E2E - TTFT) / (output tokens - 1), per request
  with more than one output token. ITL: every gap between output chunks, of every request.
  E2E (e2el): time to the last output chunk. Each: mean, median, std and percentiles, in ms,
  over completed requests; None when there is nothing to measure.
- Throughput: completed requests, output tokens, and prompt + output tokens, per second of the
  run (first request sent to last one finished).
- Goodput: completed requests per second that meet every SLO given (ttft, tpot, e2el, in ms);
  a request with one output token has a TPOT of 0, as in vLLM.
Failed requests count in neither latencies nor throughput; their errors are tallied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from .client import RequestResult

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def compute_metrics(results: Sequence[RequestResult], duration_s: float,
                    goodput_slos_ms: dict[str, float],
                    percentiles: Sequence[float] = (90.0, 99.0)) -> dict:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    cached_tokens = sum(r.cached_tokens for r in done)
    metrics = {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "cached_prompt_tokens": cached_tokens,
        "prefix_cache_hit_rate": cached_tokens / input_tokens if input_tokens else None,
        "request_throughput": len(done) / duration_s,
        "request_goodput": (count_good(done, goodput_slos_ms) / duration_s
                            if goodput_slos_ms else None),
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    samples = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.latency_s for r in done],
    }
    for name in LATENCY_METRICS:
        metrics.update(latency_stats(name, samples[name], percentiles))
    metrics["errors"] = dict(Counter(r.error for r in results if not r.ok).most_common())
    return metrics


def latency_stats(name: str, values_s: Sequence[float],
                  percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of `values_s`, in milliseconds, under vLLM's key names."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms",
            *(f"{percentile_key(p)}_{name}_ms" for p in percentiles)]
    if not values_s:
        return dict.fromkeys(keys)
    values_ms = np.asarray(values_s, dtype=float) * 1000
    stats = [values_ms.mean(), np.median(values_ms), values_ms.std(),
             *np.percentile(values_ms, list(percentiles))]
    return {key: float(value) for key, value in zip(keys, stats, strict=True)}


def percentile_key(p: float) -> str:
    return f"p{p:g}"  # 90 -> p90, 99.9 -> p99.9


def count_good(done: Sequence[RequestResult], slos_ms: dict[str, float]) -> int:
    def measured_ms(result: RequestResult, name: str) -> float:
        seconds = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2el": result.latency_s}
        return seconds[name] * 1000

    return sum(all(measured_ms(r, name) <= slo for name, slo in slos_ms.items()) for r in done)
