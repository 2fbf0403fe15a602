"""The server's own counters across a run (`--server-metrics`): /metrics (Prometheus text) read
before and after the measured requests, and what every counter and histogram sum and count
gained in between. It shows what the client cannot see, such as pagewire's KV transfer seconds
and bytes (`pagewire:kv_transfer_seconds_sum`, `..._count`) or vLLM's `vllm:` counters.

Gauges and histogram buckets are left out: a difference of gauges means nothing, and buckets are
many. A server without /metrics gives None, never an error.
"""

from __future__ import annotations

import httpx

KEPT_TYPES = ("counter", "histogram", "summary")
LEFT_OUT_SUFFIXES = ("_bucket", "_created")


async def scrape(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        reply = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    return parse_counters(reply.text)


def parse_counters(text: str) -> dict[str, float]:
    """Sample name with its labels ('name{k="v"}') -> value, for counters and histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        if family.type not in KEPT_TYPES:
            continue
        for sample in family.samples:
            if sample.name.endswith(LEFT_OUT_SUFFIXES):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def counter_deltas(before: dict[str, float] | None,
                   after: dict[str, float] | None) -> dict[str, float] | None:
    """What each sample gained; samples that did not move are left out."""
    if before is None or after is None:
        return None
    deltas = {name: value - before.get(name, 0.0) for name, value in after.items()}
    return {name: delta for name, delta in sorted(deltas.items()) if delta}
