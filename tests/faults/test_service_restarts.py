"""The router or the tokenizer killed (SIGKILL) mid-stream and started again on the same port:
the streams in flight end with a clear error within seconds, requests while it is down fail at
once, and the same gateway process (never restarted) serves again as soon as it is back.
(A request past its deadline: test_deadline.py.)
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.faults.cluster import (
    MODEL,
    ProcessCluster,
    assert_no_kv_leaked,
    wait_for,
)

LONG = {"model": MODEL, "prompt": "Tell me a long story about a lighthouse.", "max_tokens": 1500,
        "temperature": 0, "ignore_eos": True}
SHORT = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = ProcessCluster(tmp_path_factory.mktemp("restarts"), prefill=1, decode=1)
    yield cluster.start()
    cluster.stop()


def stream_until_killed(base: str, kill) -> tuple[list[str], float]:
    """Streams LONG, calls kill() once the first token is in; returns the rest of the stream's
    lines and how long after the kill it ended."""
    with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        kill()
        killed_at = time.monotonic()
        rest = [line for line in lines if line]
    return rest, time.monotonic() - killed_at


def served(base: str, timeout_s: float = 30) -> dict:
    """SHORT's reply once the gateway gets one; the first tries may meet a channel that is
    still reconnecting."""
    def ask():
        reply = httpx.post(f"{base}/v1/completions", json=SHORT, timeout=30)
        assert reply.status_code in (200, 503), reply.text  # 503: not reconnected yet
        return reply.json() if reply.status_code == 200 else None
    return wait_for(ask, timeout_s, "the gateway never served again", interval_s=0.5)


@pytest.mark.parametrize("service", ["router", "tokenizer"])
def test_restarted_service_fails_streams_in_flight_and_the_gateway_reconnects(cluster, service):
    rest, ended_after_s = stream_until_killed(cluster.base, lambda: cluster.kill(service))
    assert ended_after_s < 5, f"the stream ended {ended_after_s:.1f} s after the kill"
    assert any('"error"' in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"

    started = time.monotonic()
    down = httpx.post(f"{cluster.base}/v1/completions", json=SHORT, timeout=30)
    assert down.status_code == 503, down.text
    assert time.monotonic() - started < 5

    cluster.restart(service)
    restarted_at = time.monotonic()
    assert served(cluster.base)["choices"][0]["finish_reason"] in ("stop", "length")
    assert time.monotonic() - restarted_at < 10, "the gateway took long to reconnect"
    assert cluster["gateway"].alive
    assert_no_kv_leaked(cluster.base)
