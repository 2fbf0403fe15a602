"""One benchmark run against a server: warm up, send the workload, measure, and return the
result as plain data (what the JSON file holds)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

from tqdm import tqdm

from .client import RequestResult, first_model, new_client
from .config import BenchConfig
from .datasets import build_dataset
from .load import Sender, run_load, run_session
from .metrics import compute_metrics
from .server_metrics import counter_deltas, scrape

WARMUP_SEED_OFFSET = 1_000_003  # warm-up prompts share nothing with the measured ones


async def run_benchmark(config: BenchConfig) -> dict:
    async with new_client(config.root_url, config.api_key, config.request_timeout_s) as client:
        model = config.model or await first_model(client)
        sender = Sender(client, model, config)
        await warm_up(sender, config)
        sessions = build_dataset(config.dataset)
        num_requests = sum(len(session) for session in sessions)
        before = await scrape(client) if config.server_metrics else None
        with tqdm(total=num_requests, desc=config.label, unit="req", dynamic_ncols=True,
                  disable=not config.show_progress) as progress:
            results, duration_s = await run_load(sender, sessions, config.load, progress)
        after = await scrape(client) if config.server_metrics else None
    metrics = compute_metrics(results, duration_s, config.goodput_slos_ms, config.percentiles)
    record = result_record(config, model, metrics, results)
    if config.server_metrics:
        record["server_metrics"] = counter_deltas(before, after)
    return record


async def warm_up(sender: Sender, config: BenchConfig) -> None:
    """A few sessions of other prompts, one at a time; the first failure stops the benchmark
    (a wrong URL, model or flag shows at once, not as 100% failed requests)."""
    if config.num_warmups == 0:
        return
    dataset = dataclasses.replace(config.dataset, num_prompts=config.num_warmups,
                                  seed=config.dataset.seed + WARMUP_SEED_OFFSET)
    for session in build_dataset(dataset):
        with tqdm(disable=True) as no_progress:
            results = await run_session(sender, session, contextlib.nullcontext(), no_progress)
        for result in results:
            if not result.ok:
                raise RuntimeError(f"the warm-up request failed: {result.error}")


def result_record(config: BenchConfig, model: str, metrics: dict,
                  results: list[RequestResult]) -> dict:
    sent = [r.start_s for r in results if r.start_s]
    first_sent = min(sent) if sent else 0.0
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "label": config.label,
        "base_url": config.base_url,
        "model": model,
        "request_rate": _json_rate(config.load.request_rate),
        "max_concurrency": config.load.max_concurrency,
        "config": _json_config(config),
        "metrics": metrics,
        "requests": [request_record(r, first_sent) for r in results],
    }


def request_record(result: RequestResult, first_sent: float) -> dict:
    return {"ok": result.ok, "error": result.error,
            "start_s": round(result.start_s - first_sent, 6) if result.start_s else None,
            "ttft_s": round(result.ttft_s, 6), "tpot_s": round(result.tpot_s, 6),
            "latency_s": round(result.latency_s, 6),
            "itl_s": [round(gap, 6) for gap in result.itl_s],
            "prompt_tokens": result.prompt_tokens, "output_tokens": result.output_tokens,
            "cached_tokens": result.cached_tokens}


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate  # JSON has no infinity


def _json_config(config: BenchConfig) -> dict:
    record = dataclasses.asdict(config)
    record.pop("api_key")
    record["load"]["request_rate"] = _json_rate(config.load.request_rate)
    record["percentiles"] = list(config.percentiles)
    return record
