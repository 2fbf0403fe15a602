"""The prefix index in Redis: which workers hold the KV block of a given prefix hash, per model.

Workers publish the net events of their block manager (`BlockManager.take_events()`); routers ask
how many LEADING blocks of a prompt each candidate worker holds. Hashes are the chained block
hashes of `pagewire.engine.prefix_hash`, so a hash names a whole prefix, not one block's tokens.

Key layout (`{ns}` namespace, `{model}` the served model's name, hashes in decimal):
    {ns}:{model}:blk:{hash}      zset: member worker id, score = the unix time (publisher's clock)
                                 at which that worker's entry expires. Key PEXPIRE ttl, pushed
                                 forward by every publish of the hash; expired members are pruned
                                 there too and ignored by readers before that.
    {ns}:{model}:held:{worker}   set of the hashes this worker has published (PEXPIRE ttl); lets
                                 `drop_worker` and `republish_all` retract them without a SCAN.
Every entry expires on its own, so a crashed worker vanishes from the index within ttl_s even
from blocks that live workers keep refreshing. The price: a live worker calls
`republish_all(held)` every ~ttl_s/3 with what it holds, which also restores the index after
Redis loses its data (no persistence). Clocks of workers and routers must agree to well within
ttl_s (NTP does).

Several routers share the index with no coordination: reads have no side effects and every
write comes from the worker that owns the entry. Spreading routers' load is routing's job.

This module must never hash tokens itself (callers pass `prefix_hash` values), never pickle,
and never block serving: a caller treats a Redis error as "no prefix information".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

_FIRST_LOOKUP_CHUNK = 32  # blocks per round trip at first (512 tokens at 16 per block), then x4
_WRITE_CHUNK = 2048  # hashes per pipeline in republish_all/drop_worker: bounds client memory


class PrefixIndex:
    def __init__(self, redis_client, model: str, namespace: str = "pagewire", ttl_s: float = 60.0):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if not model:
            raise ValueError("model must be non-empty")
        self._redis = redis_client
        self._ttl_s = ttl_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._block_prefix = f"{namespace}:{model}:blk:"
        self._held_prefix = f"{namespace}:{model}:held:"

    def publish(self, worker_id: str, stored: Sequence[int], removed: Sequence[int]) -> None:
        """Apply one batch of a worker's net block events. One round trip; none when both empty."""
        if not stored and not removed:
            return
        pipe = self._redis.pipeline(transaction=False)
        self._write(pipe, worker_id, [str(h) for h in stored], [str(h) for h in removed])
        pipe.execute()

    def republish_all(self, worker_id: str, held_hashes: Iterable[int]) -> None:
        """Make the index say exactly `held_hashes` for this worker, with fresh expiries."""
        held = list(dict.fromkeys(str(h) for h in held_hashes))
        previous = {_text(m) for m in self._redis.smembers(self._held_prefix + worker_id)}
        gone = list(previous.difference(held))
        for start in range(0, max(len(held), len(gone)), _WRITE_CHUNK):
            end = start + _WRITE_CHUNK
            pipe = self._redis.pipeline(transaction=False)
            self._write(pipe, worker_id, held[start:end], gone[start:end])
            pipe.execute()

    def drop_worker(self, worker_id: str) -> None:
        """Retract everything `worker_id` published (it left, or restarted with an empty cache)."""
        held_key = self._held_prefix + worker_id
        held = [_text(m) for m in self._redis.smembers(held_key)]
        for start in range(0, len(held), _WRITE_CHUNK):
            pipe = self._redis.pipeline(transaction=False)
            for block_hash in held[start : start + _WRITE_CHUNK]:
                pipe.zrem(self._block_prefix + block_hash, worker_id)
            pipe.execute()
        self._redis.delete(held_key)

    def longest_prefix(
        self, block_hashes: Sequence[int], worker_ids: Sequence[int | str]
    ) -> dict[str, int]:
        """For each candidate worker: the number of LEADING blocks of block_hashes it holds.

        Counting stops at a worker's first miss. Lookups are pipelined in chunks that grow x4,
        and stop once no candidate can extend, so most prompts take one round trip.
        """
        num_cached = {str(w): 0 for w in worker_ids}
        extending = list(num_cached)
        now = time.time()
        start, chunk = 0, _FIRST_LOOKUP_CHUNK
        while extending and start < len(block_hashes):
            part = block_hashes[start : start + chunk]
            asked = extending
            pipe = self._redis.pipeline(transaction=False)
            for block_hash in part:
                pipe.zmscore(self._block_prefix + str(block_hash), asked)
            for scores in pipe.execute():
                expires_at = dict(zip(asked, scores))
                extending = [w for w in extending if (expires_at[w] or 0.0) > now]
                for worker_id in extending:
                    num_cached[worker_id] += 1
                if not extending:
                    break
            start, chunk = start + len(part), chunk * 4
        return num_cached

    def _write(self, pipe, worker_id: str, stored: list[str], removed: list[str]) -> None:
        now = time.time()
        expires_at = now + self._ttl_s
        for block_hash in stored:
            key = self._block_prefix + block_hash
            pipe.zadd(key, {worker_id: expires_at})
            pipe.zremrangebyscore(key, "-inf", now)  # other workers' lapsed entries
            pipe.pexpire(key, self._ttl_ms)
        for block_hash in removed:
            pipe.zrem(self._block_prefix + block_hash, worker_id)
        held_key = self._held_prefix + worker_id
        if stored:
            pipe.sadd(held_key, *stored)
        if removed:
            pipe.srem(held_key, *removed)
        pipe.pexpire(held_key, self._ttl_ms)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
