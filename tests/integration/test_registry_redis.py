"""Worker registry against a real Redis: heartbeats, expiry, role and model filters."""

from __future__ import annotations

import time

import pytest
import redis

from pagewire.cluster.registry import WorkerInfo, WorkerRegistry
from tests.integration.redis_helpers import REDIS_URL


def info(worker_id, role="both", model="m", **load):
    return WorkerInfo(worker_id, role, f"10.0.0.1:{5000 + len(worker_id)}", model, **load)


def ids(workers):
    return [w.worker_id for w in workers]


def test_heartbeat_registers_worker_with_all_fields(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)
    worker = info("w1", "decode", running=3, waiting=1, kv_blocks_free=70,
                  kv_blocks_total=100, served=12, block_size=32)
    registry.heartbeat(worker)
    assert registry.workers() == [worker]


def test_heartbeat_upserts_latest_load(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)
    registry.heartbeat(info("w1", running=1))
    registry.heartbeat(info("w1", running=9, served=4))
    [worker] = registry.workers()
    assert (worker.running, worker.served) == (9, 4)


def test_worker_expires_without_heartbeat_and_is_pruned(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace, ttl_s=0.3)
    registry.heartbeat(info("dies"))
    registry.heartbeat(info("lives"))
    time.sleep(0.2)
    registry.heartbeat(info("lives"))
    time.sleep(0.2)
    assert ids(registry.workers()) == ["lives"]
    assert redis_client.smembers(f"{namespace}:workers") == {b"lives"}


def test_heartbeats_keep_worker_alive_past_ttl(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace, ttl_s=0.3)
    for _ in range(3):
        registry.heartbeat(info("w1"))
        time.sleep(0.15)
    assert ids(registry.workers()) == ["w1"]


def test_deregister_removes_worker_at_once(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)
    registry.heartbeat(info("a"))
    registry.heartbeat(info("b"))
    registry.deregister("a")
    assert ids(registry.workers()) == ["b"]
    registry.deregister("never-registered")  # harmless


@pytest.mark.parametrize(
    "role, expected",
    [(None, ["b", "d", "p"]), ("prefill", ["b", "p"]), ("decode", ["b", "d"]), ("both", ["b"])],
)
def test_role_filter_counts_both_as_either(redis_client, namespace, role, expected):
    registry = WorkerRegistry(redis_client, namespace)
    for worker_id, worker_role in (("p", "prefill"), ("d", "decode"), ("b", "both")):
        registry.heartbeat(info(worker_id, worker_role))
    assert ids(registry.workers(role=role)) == expected


def test_model_filter(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)
    registry.heartbeat(info("a", model="smollm2"))
    registry.heartbeat(info("b", model="qwen3"))
    assert ids(registry.workers(model="qwen3")) == ["b"]
    assert ids(registry.workers(model="qwen3", role="decode")) == ["b"]
    assert registry.workers(model="llama") == []


def test_invalid_roles_are_rejected(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)
    with pytest.raises(ValueError, match="valid roles: prefill, decode, both"):
        info("a", role="router")
    with pytest.raises(ValueError, match="unknown worker role"):
        registry.workers(role="Prefill")


def test_malformed_entry_is_skipped_not_fatal(redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)
    registry.heartbeat(info("good"))
    redis_client.hset(f"{namespace}:worker:bad", mapping={"role": "oracle", "address": "x:1"})
    redis_client.sadd(f"{namespace}:workers", "bad")
    assert ids(registry.workers()) == ["good"]


def test_namespaces_are_isolated(redis_client, namespace):
    WorkerRegistry(redis_client, namespace).heartbeat(info("a"))
    assert WorkerRegistry(redis_client, namespace + "-other").workers() == []


def test_string_decoding_client_works_too(namespace):
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=2)
    registry = WorkerRegistry(client, namespace)
    worker = info("w1", "prefill", kv_blocks_free=5, kv_blocks_total=8)
    registry.heartbeat(worker)
    assert registry.workers(role="prefill") == [worker]
    client.close()
