"""Prefill and decode workers on loopback, driven as the router drives them: reserve on the
decode worker, prefill and push KV, stream tokens. Tokens must equal the offline engine's."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pagewire import SamplingParams
from pagewire.services.worker.config import WorkerConfig
from pagewire.services.worker.server import serve, stop
from pagewire.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.worker_pair import ENGINE, push_kv, run_pair
from tests.integration.worker_pair import disaggregated as pair_request

PROMPT = "Write a short poem about the ocean at night, with stars and a lighthouse."
GREEDY = common_pb2.SamplingOptions(temperature=0, max_tokens=16, ignore_eos=True)


def run(coro_fn):
    """Starts a prefill and a decode worker, runs coro_fn(prefill, decode, addresses...)."""
    return run_pair(coro_fn)


async def disaggregated(prefill, decode, decode_addr, rid, prompt_ids, sampling=GREEDY):
    return (await pair_request(prefill, decode, decode_addr, rid, prompt_ids, sampling))[1]


def free_blocks(stats):
    return stats.kv_blocks_free == stats.kv_blocks_total


def test_disaggregated_greedy_equals_offline_engine(llm):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    expected = llm.generate({"prompt_token_ids": prompt_ids},
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    expected = expected[0].outputs[0].token_ids

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        batches = await disaggregated(prefill, decode, decode_addr, "r1", prompt_ids)
        colocated = [b async for b in decode.Generate(worker_pb2.GenerateRequest(
            request_id="r2", prompt_token_ids=prompt_ids, sampling=GREEDY))]
        with pytest.raises(grpc.aio.AioRpcError) as wrong_role:
            await prefill.Decode(worker_pb2.DecodeRequest(
                request_id="r3", prompt_token_ids=prompt_ids, sampling=GREEDY)).read()
        stats = [await s.GetStats(worker_pb2.StatsRequest()) for s in (prefill, decode)]
        return batches, colocated, wrong_role.value.code(), stats

    batches, colocated, wrong_role, stats = run(scenario)
    tokens = [t for b in batches for t in b.token_ids]
    assert tokens == expected
    assert batches[0].prompt_tokens == len(prompt_ids)
    assert batches[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [t for b in colocated for t in b.token_ids] == expected
    assert wrong_role == grpc.StatusCode.FAILED_PRECONDITION
    assert all(free_blocks(s) for s in stats)


def test_transfer_timeout_and_bad_kv_free_the_reservation(llm):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        # No prefill ever comes: the reservation must end by itself.
        stream = decode.Decode(worker_pb2.DecodeRequest(
            request_id="lonely", prompt_token_ids=prompt_ids, sampling=GREEDY,
            transfer_timeout_ms=300))
        assert (await stream.read()).HasField("reserved")
        with pytest.raises(grpc.aio.AioRpcError) as timeout:
            await stream.read()
        # A KV header from another layout is refused, and the waiting Decode fails too.
        stream = decode.Decode(worker_pb2.DecodeRequest(
            request_id="bad", prompt_token_ids=prompt_ids, sampling=GREEDY,
            transfer_timeout_ms=30000))
        await stream.read()
        header = worker_pb2.KVHeader(request_id="bad", model="SmolLM2-135M-Instruct",
                                     dtype="float32", block_size=32, num_layers=30,
                                     num_kv_heads=3, head_dim=64, num_tokens=len(prompt_ids),
                                     num_blocks=1)
        with pytest.raises(grpc.aio.AioRpcError) as mismatch:
            await push_kv(decode, [worker_pb2.KVChunk(header=header)])
        with pytest.raises(grpc.aio.AioRpcError) as decode_failed:
            await stream.read()
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await push_kv(decode, [worker_pb2.KVChunk(header=worker_pb2.KVHeader(
                request_id="nobody"))])
        # A client that disconnects mid-stream aborts its request.
        stream = decode.Generate(worker_pb2.GenerateRequest(
            request_id="gone", prompt_token_ids=prompt_ids,
            sampling=common_pb2.SamplingOptions(temperature=0, max_tokens=400,
                                                ignore_eos=True)))
        await stream.read()
        stream.cancel()
        await asyncio.sleep(0.5)
        stats = await decode.GetStats(worker_pb2.StatsRequest())
        return (timeout.value.code(), mismatch.value, decode_failed.value.code(),
                unknown.value.code(), stats)

    timeout, mismatch, decode_failed, unknown, stats = run(scenario)
    assert timeout == grpc.StatusCode.DEADLINE_EXCEEDED
    assert mismatch.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block_size: 16 here, 32 in the export" in mismatch.details()
    assert decode_failed == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown == grpc.StatusCode.NOT_FOUND
    assert free_blocks(stats) and stats.running == 0 and stats.waiting == 0


def test_worker_announces_itself_and_its_prefix_cache(llm, redis_client, namespace):
    from pagewire.cluster.prefix_index import PrefixIndex
    from pagewire.cluster.registry import WorkerRegistry
    from pagewire.engine.prefix_hash import hash_full_blocks

    prompt_ids = llm.get_tokenizer().encode(PROMPT * 3)

    async def main():
        config = WorkerConfig(role="both", port=0, engine=ENGINE, worker_id="w-test",
                              redis_url="redis://127.0.0.1:6379/0", redis_namespace=namespace)
        server = await serve(config)
        try:
            workers = WorkerRegistry(redis_client, namespace).workers(role="decode")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                async for _ in stub.Generate(worker_pb2.GenerateRequest(
                        request_id="a", prompt_token_ids=prompt_ids, sampling=GREEDY)):
                    pass
            await server.announcer.announce_once()
            index = PrefixIndex(redis_client, "SmolLM2-135M-Instruct", namespace)
            held = index.longest_prefix(hash_full_blocks(prompt_ids, 16), ["w-test"])
            return workers, held, server.bound_port
        finally:
            await stop(server, 0)

    workers, held, port = asyncio.run(main())
    assert [(w.worker_id, w.address, w.role) for w in workers] == [
        ("w-test", f"127.0.0.1:{port}", "both")]
    assert held["w-test"] == len(prompt_ids) // 16
    assert WorkerRegistry(redis_client, namespace).workers() == []  # deregistered on stop


def test_abort_ends_the_running_stream_and_frees_its_blocks():
    sampling = common_pb2.SamplingOptions(temperature=0, max_tokens=400, ignore_eos=True)

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        stream = decode.Generate(worker_pb2.GenerateRequest(
            request_id="long", prompt_token_ids=[5, 6, 7, 8], sampling=sampling), timeout=30)
        first = await stream.read()
        aborted = await decode.Abort(common_pb2.AbortRequest(request_id="long"), timeout=5)
        rest = []
        async with asyncio.timeout(5):  # the stream must end, not wait for its deadline
            while (message := await stream.read()) != grpc.aio.EOF:
                rest.append(message)
        stats = await decode.GetStats(worker_pb2.StatsRequest(), timeout=5)
        return first, aborted, rest, stats

    first, aborted, rest, stats = run(scenario)
    assert aborted.found
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) < 400
    assert free_blocks(stats) and stats.running == 0
