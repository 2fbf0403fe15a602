"""A prefill and a decode worker on loopback, driven as the router drives them: reserve on the
decode worker, Prefill naming the reservation, then the decode worker's tokens."""

from __future__ import annotations

import asyncio

import grpc

from pagewire.config import EngineConfig
from pagewire.services.worker.config import WorkerConfig
from pagewire.services.worker.server import serve, stop
from pagewire.v1 import worker_pb2, worker_pb2_grpc

ENGINE = EngineConfig(kv_cache_memory_bytes=64 << 20, max_model_len=1024, show_progress=False)


def run_pair(scenario, prefill_fields: dict | None = None, decode_fields: dict | None = None,
             engine: EngineConfig = ENGINE):
    """Starts a prefill and a decode worker with these WorkerConfig fields, runs
    scenario(prefill stub, decode stub, prefill address, decode address), stops both."""
    async def main():
        servers = [await serve(WorkerConfig(role=role, port=0, engine=engine, **(fields or {})))
                   for role, fields in (("prefill", prefill_fields), ("decode", decode_fields))]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.bound_port}") for s in servers]
        try:
            stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
            return await scenario(*stubs, *[f"127.0.0.1:{s.bound_port}" for s in servers])
        finally:
            for channel in channels:
                await channel.close()
            for server in servers:
                await stop(server, 0)
    return asyncio.run(main())


def prefill_request(rid: str, prompt_ids, sampling, decode_addr: str,
                    reserved: worker_pb2.Reserved, **fields) -> worker_pb2.PrefillRequest:
    """What the router sends the prefill worker once the decode worker has reserved."""
    return worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt_ids, sampling=sampling,
        decode_worker_address=decode_addr, skip_blocks=reserved.skip_blocks,
        decode_block_ids=reserved.block_ids, decode_cache_id=reserved.cache_id, **fields)


async def disaggregated(prefill, decode, decode_addr, rid, prompt_ids, sampling,
                        transfer_timeout_ms: int = 30000):
    """(the PrefillResponse, the decode worker's token batches) of one request."""
    stream = decode.Decode(worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt_ids, sampling=sampling,
        transfer_timeout_ms=transfer_timeout_ms))
    first = await stream.read()
    assert first.HasField("reserved")
    prefilled = await prefill.Prefill(prefill_request(rid, prompt_ids, sampling, decode_addr,
                                                      first.reserved))
    batches = []
    while (message := await stream.read()) != grpc.aio.EOF:  # read() and async-for can't mix
        batches.append(message.tokens)
    return prefilled, batches


async def push_kv(stub, chunks) -> list[worker_pb2.PushKVResponse]:
    """Every answer of a PushKV that sends `chunks` (raises its error)."""
    return [reply async for reply in stub.PushKV(iter(chunks))]


def all_free(stats) -> bool:
    return stats.kv_blocks_free == stats.kv_blocks_total and stats.running == 0 and \
        stats.waiting == 0
