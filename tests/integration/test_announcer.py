"""A worker's registry heartbeats (services/worker/announcer.py) against real Redis, with an
engine whose step lasts longer than the registry's TTL: the soak saw a prefill worker drop out
of the registry (and requests get 503) while a 2048-token chunk ran on a busy CPU."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pagewire.cluster.registry import WorkerRegistry
from pagewire.services.worker.announcer import Announcer
from tests.integration.redis_helpers import REDIS_URL


class FakeBlocks:
    num_free_blocks, num_blocks, block_size = 10, 10, 16

    def take_events(self):
        return [], []

    def cached_hashes(self):
        return []


class SteppingEngine:
    """An AsyncEngine stand-in: `call` waits while a step runs (`stepping` cleared)."""

    def __init__(self) -> None:
        self.engine = SimpleNamespace(source=SimpleNamespace(name="m"),
                                      block_manager=FakeBlocks(),
                                      scheduler=SimpleNamespace(running=[], waiting=[]),
                                      speculator=None)
        self.idle = asyncio.Event()
        self.idle.set()

    async def call(self, fn):
        await self.idle.wait()
        return fn(self.engine)


def test_a_step_longer_than_the_ttl_keeps_the_worker_registered_a_wedged_engine_does_not(
        redis_client, namespace):
    registry = WorkerRegistry(redis_client, namespace)

    def free_blocks():
        return [w.kv_blocks_free for w in registry.workers()]

    async def main():
        engine = SteppingEngine()
        announcer = Announcer(engine, REDIS_URL, "w1", "prefill", "127.0.0.1:1", lambda: 0,
                              namespace, interval_s=0.05, ttl_s=0.3, max_stale_s=1.5)
        await announcer.announce_once()
        announcer.start()
        try:
            engine.idle.clear()  # a step of 0.8 s: more than twice the TTL
            engine.engine.block_manager.num_free_blocks = 4
            await asyncio.sleep(0.8)
            during_step = free_blocks()
            engine.idle.set()
            await asyncio.sleep(0.2)
            after_step = free_blocks()
            engine.idle.clear()  # and now it never answers again
            await asyncio.sleep(1.5 + 0.3 + 0.3)
            wedged = free_blocks()
        finally:
            await announcer.stop()
        return during_step, after_step, wedged

    during_step, after_step, wedged = asyncio.run(main())
    assert during_step == [10]  # still registered, with the last load it knew
    assert after_step == [4]  # the fresh load once the step ended
    assert wedged == []  # past max_stale_s the entry expires
