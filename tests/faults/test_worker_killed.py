"""A decode worker process killed with SIGKILL mid-stream: its client gets an error within
seconds, nothing hangs, and the next requests go to the surviving worker at once, before the
registry's entry for the dead one has even expired. Started again on the same port, it rejoins
through the registry and takes its share of traffic. Real processes, real signals, real Redis.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.faults.cluster import (
    MODEL,
    TRANSPORTS,
    ProcessCluster,
    Service,
    assert_no_kv_leaked,
    cluster_workers,
    kv_bytes_by_transport,
    wait_for,
)


@pytest.fixture(params=TRANSPORTS)
def cluster(tmp_path, request):
    cluster = ProcessCluster(tmp_path, prefill=1, decode=2,
                             worker_env={"PAGEWIRE_KV_TRANSPORTS": request.param})
    cluster.transport = request.param
    yield cluster.start()
    cluster.stop()


def serving_decode_worker(cluster: ProcessCluster) -> Service:
    """The decode worker that is running a request now (heartbeats carry the load every second)."""
    def find():
        for worker in cluster_workers(cluster.base):
            if worker["role"] == "decode" and worker["running"] > 0:
                return next(w for w in cluster.workers if w.address == worker["address"])
    return wait_for(find, 10, "no decode worker reported a running request", interval_s=0.1)


def served_by(cluster: ProcessCluster, worker: Service) -> int:
    return next((w["served"] for w in cluster_workers(cluster.base)
                 if w["address"] == worker.address), 0)


def burst(cluster: ProcessCluster, size: int = 6) -> None:
    """`size` short requests at once (load alone would spread them over the decode workers);
    every one must be served."""
    def ask(_):
        return httpx.post(f"{cluster.base}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})

    with ThreadPoolExecutor(size) as pool:
        replies = list(pool.map(ask, range(size)))
    assert [r.status_code for r in replies] == [200] * size, [r.text for r in replies]


def test_decode_worker_killed_mid_stream_fails_fast_and_rejoins_when_restarted(cluster):
    body = {"model": MODEL, "prompt": "Tell me a long story about a lighthouse.",
            "max_tokens": 800, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{cluster.base}/v1/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        victim = serving_decode_worker(cluster)
        cluster.kill(victim.name)
        killed_at = time.monotonic()
        rest = [line for line in lines if line]
        ended_after_s = time.monotonic() - killed_at
    assert ended_after_s < 5, f"the stream ended {ended_after_s:.1f} s after the kill"
    assert any('"error"' in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"
    # At once, while the registry still lists the dead worker (and its stale load): a burst,
    # so that load alone would send some of it to the dead one. All must be served.
    burst(cluster)
    assert_no_kv_leaked(cluster.base, cluster.dead_worker_addresses())

    cluster.restart(victim.name)  # same port, same worker id, an empty cache

    def takes_traffic() -> bool:
        burst(cluster)
        time.sleep(1.5)  # its next heartbeat tells what it served
        return served_by(cluster, victim) > 0
    wait_for(takes_traffic, 45, "the restarted decode worker took no traffic", interval_s=0.5)
    assert_no_kv_leaked(cluster.base)
    # The restarted worker has a new cache: the prefill worker shook hands again before it
    # wrote a byte into it, and went on with the same transport.
    assert set(kv_bytes_by_transport(cluster.base)) == {cluster.transport}
