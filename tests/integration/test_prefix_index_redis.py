"""Prefix index against a real Redis: leading-block counts, removal, expiry, recovery, parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pagewire.cluster.prefix_index import PrefixIndex
from pagewire.engine import prefix_hash
from pagewire.engine.block_manager import BlockManager
from pagewire.engine.prefix_hash import hash_full_blocks
from tests.integration.redis_helpers import delete_namespace

H = [1000 + i for i in range(8)]  # stand-in chained hashes: only identity matters to the index


def test_longest_prefix_counts_leading_blocks_per_worker(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    index.publish("a", H[:3], [])
    index.publish("b", [H[0], H[2], H[3]], [])  # a gap at H[1]: only H[0] leads
    index.publish("c", H[1:4], [])  # no H[0]: nothing leads
    assert index.longest_prefix(H[:4], ["a", "b", "c", "idle"]) == {
        "a": 3, "b": 1, "c": 0, "idle": 0
    }


def test_removed_blocks_stop_the_prefix(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    index.publish("a", H[:4], [])
    index.publish("b", H[:4], [])
    index.publish("a", [H[4]], [H[2]])
    assert index.longest_prefix(H[:5], ["a", "b"]) == {"a": 2, "b": 4}


def test_edge_inputs(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    index.publish("7", H[:2], [])
    index.publish("a", [], [])  # nothing to do
    assert index.longest_prefix(H[:2], [7, "7"]) == {"7": 2}  # int ids are ids as text
    assert index.longest_prefix([], ["7"]) == {"7": 0}
    assert index.longest_prefix(H[:2], []) == {}


def test_long_prompt_spans_several_lookup_chunks(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    hashes = list(range(1, 301))
    index.publish("a", hashes[:170], [])
    index.publish("b", hashes[:33], [])
    assert index.longest_prefix(hashes, ["a", "b"]) == {"a": 170, "b": 33}


def test_models_are_isolated(redis_client, namespace):
    PrefixIndex(redis_client, "llama", namespace).publish("a", H[:2], [])
    assert PrefixIndex(redis_client, "qwen", namespace).longest_prefix(H[:2], ["a"]) == {"a": 0}


def test_entries_expire_without_republish(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace, ttl_s=0.3)
    index.publish("a", H[:3], [])
    assert index.longest_prefix(H[:3], ["a"]) == {"a": 3}
    time.sleep(0.4)
    assert index.longest_prefix(H[:3], ["a"]) == {"a": 0}
    assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []


def test_dead_worker_expires_from_blocks_a_live_worker_refreshes(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace, ttl_s=0.4)
    index.publish("dead", H[:2], [])
    time.sleep(0.25)
    index.publish("live", H[:2], [])
    time.sleep(0.25)
    assert index.longest_prefix(H[:2], ["dead", "live"]) == {"dead": 0, "live": 2}


def test_republish_all_keeps_entries_alive(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace, ttl_s=0.4)
    index.publish("a", H[:3], [])
    for _ in range(2):
        time.sleep(0.25)
        index.republish_all("a", H[:3])
    assert index.longest_prefix(H[:3], ["a"]) == {"a": 3}


def test_republish_all_restores_index_after_redis_loses_it(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    index.publish("a", H[:4], [])
    index.publish("b", H[:2], [])
    delete_namespace(redis_client, namespace)  # what a Redis restart without persistence does
    assert index.longest_prefix(H[:4], ["a", "b"]) == {"a": 0, "b": 0}
    index.republish_all("a", H[:4])
    index.republish_all("b", H[:2])
    assert index.longest_prefix(H[:4], ["a", "b"]) == {"a": 4, "b": 2}


def test_republish_all_retracts_blocks_no_longer_held(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    index.publish("a", H[:4], [])
    index.republish_all("a", [H[0], H[1], H[5]])
    assert index.longest_prefix(H[:4], ["a"]) == {"a": 2}
    assert redis_client.smembers(f"{namespace}:m:held:a") == {str(h).encode() for h in
                                                              (H[0], H[1], H[5])}


def test_drop_worker_retracts_only_its_entries(redis_client, namespace):
    index = PrefixIndex(redis_client, "m", namespace)
    index.publish("a", H[:3], [])
    index.publish("b", H[:3], [])
    index.drop_worker("a")
    assert index.longest_prefix(H[:3], ["a", "b"]) == {"a": 0, "b": 3}
    assert not redis_client.exists(f"{namespace}:m:held:a")
    index.drop_worker("never-published")  # harmless


def _router_hashes_in_fresh_process(token_ids, block_size):
    """prefix_hash in another interpreter with another hash seed, as the router process runs it."""
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('prefix_hash', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps(module.hash_full_blocks(json.loads(sys.argv[2]), int(sys.argv[3]))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, prefix_hash.__file__, json.dumps(token_ids),
         str(block_size)],
        env={**os.environ, "PYTHONHASHSEED": "4242"}, capture_output=True, text=True,
        check=True, timeout=30,
    )
    return json.loads(out.stdout)


def test_router_hashes_match_what_a_block_manager_worker_publishes(redis_client, namespace):
    block_size = 16
    index = PrefixIndex(redis_client, "m", namespace)
    prompt = [(7 * i + 3) % 32000 for i in range(40)]  # 2 full blocks + 8 tokens
    # Worker side: the engine caches the prompt's full blocks and publishes its block events.
    block_manager = BlockManager(num_blocks=4, block_size=block_size)
    block_table: list[int] = []
    assert block_manager.allocate(block_table, len(prompt))
    block_manager.cache_full_blocks(block_table, hash_full_blocks(prompt, block_size), len(prompt))
    stored, removed = block_manager.take_events()
    index.publish("w", stored, removed)
    # Router side, another process: the same prompt plus a follow-up turn.
    follow_up = prompt + [11] * 30
    router_hashes = _router_hashes_in_fresh_process(follow_up, block_size)
    assert router_hashes[:2] == stored and len(router_hashes) == 4
    assert index.longest_prefix(router_hashes, ["w"]) == {"w": 2}
    # Evicting the cached blocks for another sequence retracts them from the index.
    block_manager.free(block_table)
    assert block_manager.allocate([], 4 * block_size)
    stored, removed = block_manager.take_events()
    assert stored == [] and sorted(removed) == sorted(router_hashes[:2])
    index.publish("w", stored, removed)
    assert index.longest_prefix(router_hashes, ["w"]) == {"w": 0}
