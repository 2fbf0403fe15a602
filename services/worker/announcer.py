"""A worker's presence in Redis: registry heartbeats with its load, and its prefix-cache
events for the router's index. Redis being away never stops the worker: each round that
fails is logged once per outage and retried on the next tick; the full republish that
follows an outage restores the index.

The load is read on the engine thread, between steps. A step can outlast the registry's TTL (a
2048-token prefill chunk on a busy two-core CPU took over 4 s, and the worker dropped out of
the registry mid-soak), so a heartbeat never waits for one: it re-sends the last load until the
engine answers, and stops only when the engine has not answered for `max_stale_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from pagewire.cluster.prefix_index import PrefixIndex
from pagewire.cluster.registry import WorkerInfo, WorkerRegistry
from pagewire.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(self, engine: AsyncEngine, redis_url: str, worker_id: str, role: str,
                 address: str, served, namespace: str = "pagewire", interval_s: float = 1.0,
                 ttl_s: float = 5.0, max_stale_s: float = 30.0, device: str = "",
                 kv_transports: str = ""):
        self.engine = engine
        self.worker_id, self.role, self.address = worker_id, role, address
        self.device, self.kv_transports = device, kv_transports  # shown in /cluster
        self.served = served  # callable: requests completed so far
        self.interval_s = interval_s
        client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self.registry = WorkerRegistry(client, namespace, ttl_s=ttl_s)
        self.index = PrefixIndex(client, engine.engine.source.name, namespace,
                                 ttl_s=max(60.0, ttl_s))
        self.max_stale_s = max_stale_s
        self._task: asyncio.Task | None = None
        self._asked: asyncio.Future | None = None  # the engine's snapshot, once it answers
        self._asked_at = 0.0
        self._last_info: WorkerInfo | None = None
        self._redis_ok = True
        self._rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        for task in (self._task, self._asked):
            if task is not None:
                task.cancel()
        try:
            await asyncio.to_thread(self.registry.deregister, self.worker_id)
        except redis.RedisError:
            pass

    async def _loop(self) -> None:
        while True:
            await self.announce_once()
            await asyncio.sleep(self.interval_s)

    async def announce_once(self) -> None:
        snapshot = await self._fresh_snapshot()
        if snapshot is None:
            await self._keep_alive()
            return
        info, stored, removed, held = snapshot
        # Republish everything now and then (entries expire) and right after an outage.
        full = not self._redis_ok or self._rounds % 20 == 0
        try:
            await asyncio.to_thread(self._write, info, stored, removed, held if full else None)
        except redis.RedisError as exc:
            self._redis_lost(exc)
        else:
            if not self._redis_ok:
                logger.info("Redis is back: registry and prefix index republished")
            self._redis_ok = True
        self._rounds += 1

    async def _fresh_snapshot(self):
        """The engine's snapshot, or None when a step holds the engine past interval_s (the
        request stays queued; its index events are taken by whichever round gets it)."""
        if self._asked is None:
            self._asked = asyncio.ensure_future(self.engine.call(self._snapshot))
            self._asked_at = time.monotonic()
        wait_s = None if self._last_info is None else self.interval_s
        try:
            snapshot = await asyncio.wait_for(asyncio.shield(self._asked), wait_s)
        except TimeoutError:
            return None
        finally:
            if self._asked.done():
                self._asked = None
        self._last_info = snapshot[0]
        return snapshot

    async def _keep_alive(self) -> None:
        """The last load again, unless the engine has not answered for max_stale_s (then the
        entry expires: a wedged engine must not keep receiving requests)."""
        if time.monotonic() - self._asked_at > self.max_stale_s:
            return
        try:
            await asyncio.to_thread(self.registry.heartbeat, self._last_info)
        except redis.RedisError as exc:
            self._redis_lost(exc)

    def _redis_lost(self, exc: redis.RedisError) -> None:
        if self._redis_ok:
            logger.warning("Redis unreachable, serving on without the index: %s", exc)
        self._redis_ok = False

    def _snapshot(self, engine):
        stored, removed = engine.block_manager.take_events()
        bm = engine.block_manager
        info = WorkerInfo(worker_id=self.worker_id, role=self.role, address=self.address,
                          model=engine.source.name, running=len(engine.scheduler.running),
                          waiting=len(engine.scheduler.waiting),
                          kv_blocks_free=bm.num_free_blocks, kv_blocks_total=bm.num_blocks,
                          served=self.served(), block_size=bm.block_size,
                          device=self.device, kv_transports=self.kv_transports,
                          **_spec_decode_fields(engine))
        return info, stored, removed, bm.cached_hashes()

    def _write(self, info, stored, removed, held) -> None:
        self.registry.heartbeat(info)
        if held is not None:
            self.index.republish_all(self.worker_id, held)
        elif stored or removed:
            self.index.publish(self.worker_id, stored, removed)


def _spec_decode_fields(engine) -> dict:
    if engine.speculator is None:
        return {}
    stats = engine.speculator.stats
    return {"spec_num_drafts": stats.num_drafts,
            "spec_num_draft_tokens": stats.num_draft_tokens,
            "spec_num_accepted_tokens": stats.num_accepted_tokens,
            "spec_accepted_per_position": ",".join(map(str, stats.accepted_per_position))}
