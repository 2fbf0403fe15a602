"""A prefill worker killed (SIGKILL) in the middle of pushing a prompt's KV to the decode worker:
the request is retried on another prefill worker, into the reservation the decode worker still
holds, and completes; with no prefill worker left it fails at once with a clear error. Either
way no KV block stays reserved, and the retried request keeps its output constraint. The
senders pause between KV messages (a test-only hook, off by default) so that each kill lands
inside a transfer."""

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
    kv_bytes_by_transport,
    wait_for,
)

PUSH_PAUSE_S = 2.5  # two KV messages: the kill has 5 s to land inside the transfer
PUSH_STARTED = "test hook: KV push of"
PROMPT = ("The lighthouse keeper counted the ships that passed the cape each night, wrote their "
          "names in a blue notebook, and wondered where each of them was going. ") * 5
# Constrained (lower-case letters and spaces only): the retry must keep the constraint.
BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "structured_outputs": {"regex": "[a-z ]{60}"}}


@pytest.fixture(params=TRANSPORTS)
def cluster(tmp_path, request):
    cluster = ProcessCluster(tmp_path, prefill=2, decode=1, worker_env={
        "PAGEWIRE_TEST_KV_PUSH_PAUSE_S": str(PUSH_PAUSE_S),
        "PAGEWIRE_KV_TRANSPORTS": request.param})
    cluster.transport = request.param
    yield cluster.start()
    cluster.stop()


def ask_and_kill_the_sender(cluster: ProcessCluster, prefills: list[Service]):
    """Sends a completion, SIGKILLs the prefill worker that starts pushing its KV; returns
    (the sender killed, the reply, seconds from the kill to the reply)."""
    pushes = {p.name: p.log().count(PUSH_STARTED) for p in prefills}
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(httpx.post, f"{cluster.base}/v1/completions", json=BODY, timeout=60)
        sender = wait_for(lambda: next((p for p in prefills if p.alive and
                                        p.log().count(PUSH_STARTED) > pushes[p.name]), None),
                          30, "no prefill worker started a KV push", interval_s=0.05)
        cluster.kill(sender.name)
        killed_at = time.monotonic()
        reply = asked.result()
    return sender, reply, time.monotonic() - killed_at


def test_prefill_worker_killed_mid_transfer_is_retried_or_fails_fast(cluster):
    prefills = [cluster["prefill-0"], cluster["prefill-1"]]
    sender, reply, after_s = ask_and_kill_the_sender(cluster, prefills)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"] and set(choice["text"]) <= set("abcdefghijklmnopqrstuvwxyz "), choice
    other = next(p for p in prefills if p is not sender)
    assert other.log().count(PUSH_STARTED) == 1, "not retried on the other prefill worker"
    assert set(kv_bytes_by_transport(cluster.base)) == {cluster.transport}
    assert after_s < 30
    assert_no_kv_leaked(cluster.base, cluster.dead_worker_addresses())

    # The last prefill worker killed mid-transfer: nobody can retry it, so it fails, quickly.
    sender, reply, after_s = ask_and_kill_the_sender(cluster, prefills)
    assert sender is other
    assert reply.status_code == 503, reply.text
    assert "failed" in reply.json()["error"]["message"]
    assert after_s < 5
    assert_no_kv_leaked(cluster.base, cluster.dead_worker_addresses())
