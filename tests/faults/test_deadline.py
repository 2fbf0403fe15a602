"""A request that outlives the gateway's deadline is ended on every tier, not only at the
gateway, and frees its KV blocks everywhere: on every KV transport."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.faults.cluster import (
    MODEL,
    TRANSPORTS,
    ProcessCluster,
    assert_no_kv_leaked,
    cluster_workers,
    kv_bytes_by_transport,
    wait_for,
)

LONG = {"model": MODEL, "prompt": "Tell me a long story about a lighthouse.", "max_tokens": 1500,
        "temperature": 0, "ignore_eos": True}
DEADLINE_S = 5.0


@pytest.fixture(params=TRANSPORTS)
def cluster(tmp_path, request):
    cluster = ProcessCluster(tmp_path, prefill=1, decode=1,
                             worker_env={"PAGEWIRE_KV_TRANSPORTS": request.param})
    cluster.transport = request.param
    yield cluster.start()
    cluster.stop()


def test_request_past_its_deadline_is_aborted_on_every_tier(cluster):
    base = cluster.start_gateway("gateway-deadline", ["--request-timeout-s", str(DEADLINE_S)])
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(httpx.post, f"{base}/v1/completions", json=LONG, timeout=60)
        wait_for(lambda: any(w["running"] for w in cluster_workers(base)), DEADLINE_S,
                 "the request never ran on a worker", interval_s=0.1)
        reply = asked.result()
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["type"] == "timeout"
    assert time.monotonic() - started < DEADLINE_S + 3
    # Nothing runs on any worker any more, long before 1500 tokens could have been made.
    assert_no_kv_leaked(base, timeout_s=5)

    with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True},
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert any('"timeout"' in line for line in lines), lines[-3:]
    if response.status_code == 200:  # else no token came in time: a plain 504, as above
        assert lines[-1] == "data: [DONE]"
    assert_no_kv_leaked(base, timeout_s=5)
    assert set(kv_bytes_by_transport(base)) == {cluster.transport}
