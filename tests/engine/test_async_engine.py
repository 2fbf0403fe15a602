"""The engine thread behind asyncio: concurrent streams, errors, and aborts that free blocks."""

from __future__ import annotations

import asyncio

import pytest

from pagewire import SamplingParams
from pagewire.engine.async_engine import AsyncEngine, EngineDeadError
from pagewire.engine.llm_engine import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def submit(request_id, prompt_ids, params=GREEDY):
    return lambda engine: engine.add_request(request_id, prompt_ids, params)


def test_concurrent_streams_equal_offline_generation(llm):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(t) for t in ("The sea is", "Mountains are", "In 1969, the")]
    expected = [o.outputs[0].token_ids for o in
                llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]

    async def main():
        engine = AsyncEngine(llm.engine).start()
        try:
            async def collect(i):
                outs = [o async for o in engine.stream(f"s{i}", submit(f"s{i}", prompts[i]))]
                assert outs[-1].finished and not any(o.finished for o in outs[:-1])
                return outs[-1].outputs[0].token_ids
            return await asyncio.gather(*(collect(i) for i in range(3)))
        finally:
            await engine.stop()

    assert asyncio.run(main()) == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_bad_request_raises_and_the_engine_keeps_serving(llm):
    async def main():
        engine = AsyncEngine(llm.engine).start()
        try:
            with pytest.raises(InvalidRequestError, match="empty"):
                async for _ in engine.stream("bad", submit("bad", [])):
                    pass
            outs = [o async for o in engine.stream("good", submit("good", [1, 2, 3]))]
            return outs[-1].outputs[0].token_ids
        finally:
            await engine.stop()

    assert len(asyncio.run(main())) == GREEDY.max_tokens


def test_consumer_that_leaves_aborts_and_frees_blocks(llm):
    long_run = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        engine = AsyncEngine(llm.engine).start()
        try:
            async def listen():
                async for _ in engine.stream("gone", submit("gone", [5, 6, 7], long_run)):
                    pass
            task = asyncio.create_task(listen())
            while llm.engine.stats.num_steps == steps_before:
                await asyncio.sleep(0.01)
            task.cancel()  # what a disconnected client's RPC cancellation does
            with pytest.raises(asyncio.CancelledError):
                await task
            return await engine.call(lambda e: (e.has_unfinished_requests(),
                                                e.block_manager.num_free_blocks))
        finally:
            await engine.stop()

    steps_before = llm.engine.stats.num_steps
    unfinished, free = asyncio.run(main())
    assert not unfinished and free == llm.engine.block_manager.num_blocks


def test_a_dead_engine_thread_tells_its_owner_and_fails_callers():
    """A worker must learn that its engine thread died (and exit), not go on advertising."""
    class FailingEngine:  # the engine thread's first look at its engine fails
        def has_unfinished_requests(self):
            raise RuntimeError("device lost")

    deaths = []

    async def main():
        engine = AsyncEngine(FailingEngine(), on_death=deaths.append).start()
        engine._thread.join(5)
        with pytest.raises(EngineDeadError, match="device lost"):
            await engine.call(lambda e: None)

    asyncio.run(main())
    assert [str(e) for e in deaths] == ["device lost"]
