"""Redis stopped and started again under a serving pipeline: requests keep being served (load-
only routing on the last known workers), and the registry and the prefix index come back by
themselves, without restarting any service; on every KV transport."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import redis

from pagewire.launcher import free_port
from tests.faults.cluster import TRANSPORTS, assert_no_kv_leaked, kv_bytes_by_transport, wait_for
from tests.integration.stack import Stack

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server to start and stop a private Redis")
SYSTEM = ("You are the front desk of a mountain hut. Answer in one sentence and always mention "
          "the weather forecast for tomorrow morning. ") * 3


def start_redis(port: int) -> subprocess.Popen:
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


def cluster(stack: Stack) -> dict:
    return httpx.get(f"http://127.0.0.1:{stack.port}/cluster", timeout=10).json()


def ask(client, model: str, question: str):
    return client.chat.completions.create(
        model=model, max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_serving_survives_a_redis_restart_and_the_index_comes_back(transport):
    port = free_port()
    server = start_redis(port)
    stack = Stack(roles=("prefill", "decode"), redis_url=f"redis://127.0.0.1:{port}/0",
                  kv_transports=(transport,))
    try:
        client = stack.client()
        model = client.models.list().data[0].id
        wait_for(lambda: len(cluster(stack)["workers"]) == 2, 15, "workers never registered")
        ask(client, model, "Is the hut open?")

        server.terminate()
        server.wait(10)
        for question in ("Can I camp nearby?", "Is there water?"):  # Redis is gone
            assert ask(client, model, question).choices[0].finish_reason in ("stop", "length")
        assert cluster(stack)["prefix_index_available"] is False

        server = start_redis(port)  # empty: no registry, no index
        wait_for(lambda: cluster(stack)["prefix_index_available"] and
                 len(cluster(stack)["workers"]) == 2, 20, "the registry did not come back")
        # The prefix index is republished into the empty Redis by the worker's announcer.
        index = redis.Redis(port=port, socket_timeout=1)
        wait_for(lambda: next(index.scan_iter(match=f"{stack.namespace}:*:blk:*"), None)
                 is not None, 20, "the prefix index was not republished")
        reply = ask(client, model, "Do you serve breakfast?")
        assert reply.usage.prompt_tokens_details.cached_tokens > 0
        assert_no_kv_leaked(f"http://127.0.0.1:{stack.port}")
        # Every prompt's KV moved on the transport under test, Redis gone or not.
        assert set(kv_bytes_by_transport(f"http://127.0.0.1:{stack.port}")) == {transport}
    finally:
        stack.stop()
        server.terminate()
        server.wait(10)
