"""A worker process killed with SIGKILL mid-stream: its client gets an error within seconds,
nothing hangs, and the next requests go to the surviving workers at once, before the
registry's entry for the dead one has even expired. Real processes, real signals, real Redis.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from pagewire import launcher
from tests.integration.redis_helpers import REDIS_URL, delete_namespace

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def cluster():
    port = launcher.free_port()
    args = launcher.build_parser().parse_args(
        ["--port", str(port), "--prefill", "1", "--decode", "2",
         "--kv-cache-bytes", str(400 << 20)])
    stack = launcher.Stack()
    base = f"http://127.0.0.1:{port}"
    try:
        launcher._start_services(args, stack, REDIS_URL)
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{base}/cluster", timeout=5).json()["workers"]) < 3:
            assert time.monotonic() < deadline, "workers never registered"
            time.sleep(0.2)
        yield stack, base
    finally:
        stack.stop()
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        delete_namespace(client, f"pagewire-up-{os.getpid()}")
        client.close()


def serving_decode_pid(stack: launcher.Stack, base: str) -> int:
    """The process of the decode worker that is running a request now."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for worker in httpx.get(f"{base}/cluster", timeout=5).json()["workers"]:
            if worker["role"] == "decode" and worker["running"] > 0:
                port = worker["address"].rsplit(":", 1)[1]
                return next(p.pid for name, p in stack.processes
                            if name == "decode worker" and f"--port {port} " in
                            " ".join(p.args) + " ")
        time.sleep(0.1)  # heartbeats carry the load once a second
    raise AssertionError("no decode worker reported a running request")


def test_decode_worker_killed_mid_stream_fails_fast_and_others_serve(cluster):
    stack, base = cluster
    body = {"model": MODEL, "prompt": "Tell me a long story about a lighthouse.",
            "max_tokens": 800, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        pid = serving_decode_pid(stack, base)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rest = [line for line in lines if line]
        ended_after_s = time.monotonic() - killed_at
    assert ended_after_s < 5, f"the stream ended {ended_after_s:.1f} s after the kill"
    assert any('"error"' in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"
    # At once, while the registry still lists the dead worker (and its stale load): a burst,
    # so that load alone would send some of it to the dead one. All must be served.
    def ask(_):
        return httpx.post(f"{base}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(ask, range(6)))
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
