"""The worker service: a thin grpc.aio layer over AsyncEngine (protos/pagewire/v1/worker.proto).

A disaggregated request is a transaction (worker.proto says how): Decode reserves blocks and
waits, bounded by its transfer timeout, for the KV that the prefill worker pushes with PushKV;
PushKV checks layout and sizes before anything reaches the engine; every failure or
cancellation aborts the request on this worker, which frees its blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

import grpc
import torch

from pagewire.config import KV_CACHE_DTYPES, LOAD_FORMATS
from pagewire.engine.async_engine import AsyncEngine
from pagewire.engine.kv_transfer import KV_DTYPES, KVLayout
from pagewire.engine.llm_engine import LLMEngine
from pagewire.services.grpc_errors import (
    Aborted,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    grpc_errors,
)
from pagewire.services.grpc_options import CHANNEL_OPTIONS, KEEPALIVE_SERVER_OPTIONS
from pagewire.services.lifecycle import add_health, run_service
from pagewire.services.worker.announcer import Announcer
from pagewire.services.worker.config import WorkerConfig, advertised_address
from pagewire.services.worker.convert import sampling_from_proto, token_batch, token_logprobs
from pagewire.v1 import common_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0


class TruncatedTransfer(InvalidRequest):
    """A KV transfer that ended before all the blocks its header declares: its sender was
    killed or cut off mid-way (gRPC shows a dead client's stream as a clean end). The partial
    blocks are dropped; the reservation outlives it, for a retry from another prefill worker,
    bounded by its transfer timeout and by the Decode call that holds it."""


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, config: WorkerConfig, worker_id: str):
        self.engine = engine
        self.config = config
        self.worker_id = worker_id
        self.served = 0
        # request_id -> future of (header, layout, blocks), set by PushKV for a waiting Decode
        self._transfers: dict[str, asyncio.Future] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _require(self, role: str) -> None:
        if self.config.role not in (role, "both"):
            raise FailedPrecondition(f"this worker's role is {self.config.role}, not {role}")

    # ---- prefill role -------------------------------------------------------------------------

    @grpc_errors
    async def Prefill(self, request, context):
        self._require("prefill")
        rid, prompt = _request_id(request), list(request.prompt_token_ids)
        params = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1)
        timeout = request.timeout_ms / 1000 or DEFAULT_TIMEOUT_S
        async with asyncio.timeout(timeout):
            final = None
            async for output in self.engine.stream(
                    rid, lambda e: e.add_request(rid, prompt, params, hold_kv=True)):
                final = output
            if final.outputs[0].finish_reason == "abort":
                raise Aborted(f"{rid!r} was aborted during its prefill")
            try:
                export = await self.engine.call(
                    lambda e: e.start_kv_export(rid, request.skip_blocks))
            finally:  # the copy is queued ahead of any later step (or failed): free the blocks
                await self.engine.call(lambda e: e.abort_request(rid))
            # Waited for here, off the engine thread: the next batch is not held up.
            blocks, num_tokens = await asyncio.to_thread(export.wait), export.num_tokens
            completion = final.outputs[0]
            header = self._kv_header(rid, num_tokens, request.skip_blocks, blocks.shape[0],
                                     final)
            start = time.perf_counter()
            await self._push_kv(request.decode_worker_address, header, blocks)
            elapsed_ms = int((time.perf_counter() - start) * 1000)
        self.served += 1
        response = worker_pb2.PrefillResponse(
            first_token_id=completion.token_ids[0], cached_tokens=final.num_cached_tokens,
            kv_bytes=blocks.numel() * blocks.element_size(), kv_transfer_ms=elapsed_ms)
        if completion.logprobs:
            response.first_logprobs.CopyFrom(token_logprobs(completion.token_ids[0],
                                                            completion.logprobs[0]))
        return response

    def _kv_header(self, rid, num_tokens, skip_blocks, num_blocks, output):
        layout = self.engine.engine.kv_layout
        header = worker_pb2.KVHeader(
            request_id=rid, model=layout.model, dtype=layout.dtype,
            block_size=layout.block_size, num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_tokens=num_tokens,
            skip_blocks=skip_blocks, num_blocks=num_blocks,
            first_token_id=output.outputs[0].token_ids[0], cached_tokens=output.num_cached_tokens)
        if output.outputs[0].logprobs:
            header.first_logprobs.CopyFrom(token_logprobs(output.outputs[0].token_ids[0],
                                                             output.outputs[0].logprobs[0]))
        return header

    async def _push_kv(self, address: str, header, blocks: torch.Tensor) -> None:
        if not address:
            raise InvalidRequest("decode_worker_address is empty")
        block_bytes = self.engine.engine.kv_layout.block_bytes
        per_message = max(1, self.config.kv_chunk_bytes // block_bytes)
        pause_s = self.config.test_kv_push_pause_s

        async def chunks():
            yield worker_pb2.KVChunk(header=header)
            if pause_s:
                logger.warning("test hook: KV push of %r to %s pauses %.1f s per message",
                               header.request_id, address, pause_s)
            for first in range(0, blocks.shape[0], per_message):
                if pause_s:
                    await asyncio.sleep(pause_s)
                data = blocks[first:first + per_message].contiguous().view(torch.uint8)
                yield worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(
                    first_block=first, data=data.numpy().tobytes()))

        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        try:
            await stub.PushKV(chunks())
        except grpc.aio.AioRpcError as exc:
            raise _push_failed(address, exc) from None

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            limit = self.config.max_message_bytes
            self._channels[address] = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit), *CHANNEL_OPTIONS])
        return self._channels[address]

    # ---- decode role --------------------------------------------------------------------------

    @grpc_errors
    async def Decode(self, request, context):
        self._require("decode")
        rid, prompt = _request_id(request), list(request.prompt_token_ids)
        params = sampling_from_proto(request.sampling)
        skip = await self.engine.call(lambda e: e.reserve_kv(rid, prompt, params))
        arrived = asyncio.get_running_loop().create_future()
        self._transfers[rid] = arrived
        try:
            yield worker_pb2.DecodeResponse(reserved=worker_pb2.Reserved(
                skip_blocks=skip, num_blocks=-(-len(prompt) // self.engine.engine.config.block_size)
                - skip))
            timeout = request.transfer_timeout_ms / 1000 or DEFAULT_TIMEOUT_S
            try:
                header, layout, blocks = await asyncio.wait_for(arrived, timeout)
            except TimeoutError:
                raise TimeoutError(f"no KV arrived for {rid!r} within {timeout:.1f} s") from None
        except BaseException:
            await self.engine.call(lambda e: e.abort_request(rid))  # frees the reservation
            raise
        finally:
            self._transfers.pop(rid, None)

        first = header.first_logprobs
        first_logprobs = [((header.first_token_id, first.logprob),
                           [(top.token_id, top.logprob) for top in first.top])]

        def submit(e: LLMEngine):
            return e.import_kv_blocks(rid, prompt, [header.first_token_id], layout,
                                      header.num_tokens, header.skip_blocks, blocks, params,
                                      header.cached_tokens, first_logprobs)

        num_sent = 0
        async for output in self.engine.stream(rid, submit):
            yield worker_pb2.DecodeResponse(tokens=token_batch(output, num_sent))
            num_sent = len(output.outputs[0].token_ids)
        self.served += 1

    @grpc_errors
    async def PushKV(self, request_iterator, context):
        self._require("decode")
        header, parts, arrived = None, [], None
        try:
            async for chunk in request_iterator:
                if chunk.HasField("header"):
                    if header is not None:
                        raise InvalidRequest("a second KV header in one transfer")
                    header = chunk.header
                    arrived = self._transfers.get(header.request_id)
                    if arrived is None:
                        raise NotFound(f"no reservation awaits KV for {header.request_id!r}")
                    layout = self._checked_layout(header)  # at the handshake, not after the data
                    declared = header.num_blocks * layout.block_bytes
                    received = 0
                elif header is None:
                    raise InvalidRequest("KV blocks before the KV header")
                else:
                    received += len(chunk.blocks.data)
                    if received > declared:  # refused as it arrives, never buffered
                        raise InvalidRequest(f"the transfer holds over {declared} bytes, the "
                                             f"{header.num_blocks} blocks its header declares")
                    parts.append(chunk.blocks.data)
            if header is None:
                raise InvalidRequest("an empty KV transfer")
            # Joining and (on CUDA) pinning a prompt's KV, ~100 MB for 1k tokens of an 8B
            # model, runs on a thread: not on the event loop that streams everyone's tokens,
            # nor on the engine thread, which then only queues the copy to the device.
            blocks = await asyncio.to_thread(self._received_blocks, header, layout, parts)
        except TruncatedTransfer:
            raise  # its sender died mid-way: the reservation waits for the router's retry
        except Exception as exc:  # a wrong transfer fails the waiting Decode with its reason
            if arrived is not None and not arrived.done():
                arrived.set_exception(exc)
            raise
        if arrived.done():  # the reservation timed out meanwhile
            raise NotFound(f"the reservation for {header.request_id!r} has ended")
        arrived.set_result((header, layout, blocks))
        return worker_pb2.PushKVResponse(num_blocks=header.num_blocks)

    def _checked_layout(self, header) -> KVLayout:
        if header.dtype not in KV_DTYPES:
            raise InvalidRequest(f"unknown KV dtype {header.dtype!r}")
        layout = KVLayout(header.model, header.dtype, header.block_size, header.num_layers,
                          header.num_kv_heads, header.head_dim)
        self.engine.engine.kv_layout.check_matches(layout)  # immutable: safe off the engine thread
        return layout

    def _received_blocks(self, header, layout: KVLayout, parts: list[bytes]) -> torch.Tensor:
        blocks = self._checked_blocks(header, layout, parts)
        if self.engine.engine.runner.device.type == "cuda" and blocks.numel():
            blocks = blocks.pin_memory()
        return blocks

    def _checked_blocks(self, header, layout: KVLayout, parts: list[bytes]) -> torch.Tensor:
        data = b"".join(parts)
        if len(data) < header.num_blocks * layout.block_bytes:
            raise TruncatedTransfer(f"the transfer ended after {len(data)} bytes of the "
                                    f"{header.num_blocks} blocks of {layout.block_bytes} its "
                                    "header declares")
        if len(data) != header.num_blocks * layout.block_bytes:
            raise InvalidRequest(f"the transfer holds {len(data)} bytes; its header declares "
                                 f"{header.num_blocks} blocks of {layout.block_bytes}")
        if not data:  # every block already cached on this side (frombuffer refuses b"")
            return torch.empty(0, *layout.block_shape, dtype=KV_DTYPES[header.dtype])
        blocks = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return blocks.view(KV_DTYPES[header.dtype]).view(header.num_blocks, *layout.block_shape)

    # ---- both roles ---------------------------------------------------------------------------

    @grpc_errors
    async def Generate(self, request, context):
        rid, prompt = _request_id(request), list(request.prompt_token_ids)
        params = sampling_from_proto(request.sampling)
        num_sent = 0
        async for output in self.engine.stream(rid, lambda e: e.add_request(rid, prompt, params)):
            yield token_batch(output, num_sent)
            num_sent = len(output.outputs[0].token_ids)
        self.served += 1

    @grpc_errors
    async def Abort(self, request, context):
        rid = _request_id(request)
        arrived = self._transfers.get(rid)
        if arrived is not None and not arrived.done():
            arrived.set_exception(ConnectionAbortedError(f"{rid!r} was aborted"))
        output = await self.engine.abort(rid)
        return common_pb2.AbortResponse(found=output is not None or arrived is not None)

    @grpc_errors
    async def GetStats(self, request, context):
        def stats(e: LLMEngine) -> worker_pb2.WorkerStats:
            return worker_pb2.WorkerStats(
                worker_id=self.worker_id, role=self.config.role,
                running=len(e.scheduler.running), waiting=len(e.scheduler.waiting),
                kv_blocks_free=e.block_manager.num_free_blocks,
                kv_blocks_total=e.block_manager.num_blocks, served=self.served,
                prefix_hit_tokens=e.stats.num_prefix_hit_tokens)
        return await self.engine.call(stats)


def _push_failed(address: str, exc: grpc.aio.AioRpcError) -> Exception:
    """The decode worker's refusal passed on with its own status. Anything else (the decode
    worker gone, its reservation cancelled) aborts the request, as CANCELLED, never as
    UNAVAILABLE: that would tell the router this prefill worker is lost and to retry."""
    message = f"KV push to {address} failed: {exc.code().name}: {exc.details()}"
    by_code = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
               grpc.StatusCode.NOT_FOUND: NotFound,
               grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError}
    return by_code.get(exc.code(), Aborted)(message)


def _request_id(request) -> str:
    if not request.request_id:
        raise InvalidRequest("request_id is empty")
    return request.request_id


async def serve(config: WorkerConfig) -> grpc.aio.Server:
    """Loads the engine, starts its thread and the gRPC server; returns the started server
    (its port as server.bound_port, its engine as server.async_engine)."""
    loop = asyncio.get_running_loop()
    fatal = loop.create_future()  # run_service ends the process when it resolves

    def engine_died(error: BaseException) -> None:
        message = f"the engine thread failed ({error!r}): this worker can serve nothing"
        loop.call_soon_threadsafe(lambda: fatal.done() or fatal.set_result(message))

    engine = AsyncEngine(await asyncio.to_thread(LLMEngine, config.engine),
                         on_death=engine_died).start()
    limit = config.max_message_bytes
    server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                      ("grpc.max_receive_message_length", limit),
                                      ("grpc.so_reuseport", 0), *KEEPALIVE_SERVER_OPTIONS])
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    address = advertised_address(config, port)
    worker_id = config.worker_id or f"{config.role}@{address}"  # unique per replica
    servicer = WorkerServicer(engine, config, worker_id)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    await add_health(server, "pagewire.v1.Worker")
    await server.start()
    server.bound_port = port
    server.async_engine = engine
    server.fatal = fatal
    server.announcer = None
    if config.redis_url:
        server.announcer = Announcer(engine, config.redis_url, worker_id, config.role, address,
                                     served=lambda: servicer.served,
                                     namespace=config.redis_namespace)
        await server.announcer.announce_once()
        server.announcer.start()
    logger.info("%s serving on %s:%d", worker_id, config.host, port)
    return server


async def stop(server: grpc.aio.Server, grace_s: float = 5.0) -> None:
    if server.announcer is not None:
        await server.announcer.stop()
    await server.stop(grace_s)
    await server.async_engine.stop()


def parse_args(argv: Sequence[str] | None) -> WorkerConfig:
    defaults = WorkerConfig.from_env()
    parser = argparse.ArgumentParser(description="pagewire worker service (gRPC)")
    parser.add_argument("--role", default=defaults.role, choices=["prefill", "decode", "both"],
                        help="env PAGEWIRE_WORKER_ROLE")
    parser.add_argument("--model", default=defaults.engine.model, help="env PAGEWIRE_MODEL")
    parser.add_argument("--load-format", default=defaults.engine.load_format,
                        choices=LOAD_FORMATS,
                        help="dummy: random weights for the model's config, for benchmarks "
                             "(env PAGEWIRE_LOAD_FORMAT)")
    parser.add_argument("--host", default=defaults.host, help="env PAGEWIRE_WORKER_HOST")
    parser.add_argument("--port", type=int, default=defaults.port,
                        help="env PAGEWIRE_WORKER_PORT; 0 picks a free one")
    parser.add_argument("--worker-id", default=defaults.worker_id, help="env PAGEWIRE_WORKER_ID")
    parser.add_argument("--kv-cache-bytes", type=int,
                        default=defaults.engine.kv_cache_memory_bytes,
                        help="env PAGEWIRE_KV_CACHE_BYTES")
    parser.add_argument("--max-model-len", type=int, default=defaults.engine.max_model_len,
                        help="env PAGEWIRE_MAX_MODEL_LEN")
    parser.add_argument("--kv-cache-dtype", default=defaults.engine.kv_cache_dtype,
                        choices=tuple(KV_CACHE_DTYPES),
                        help="fp8: half the KV bytes per token, lossy; workers that exchange "
                             "KV must agree (env PAGEWIRE_KV_CACHE_DTYPE)")
    parser.add_argument("--redis-url", default=defaults.redis_url,
                        help="registry and prefix index (env PAGEWIRE_REDIS_URL)")
    parser.add_argument("--redis-namespace", default=defaults.redis_namespace,
                        help="key prefix shared with the router (env PAGEWIRE_REDIS_NAMESPACE)")
    parser.add_argument("--advertise", default=defaults.advertise_address,
                        help="host:port others reach this worker at (env "
                             "PAGEWIRE_WORKER_ADVERTISE)")
    args = parser.parse_args(argv)
    engine = dataclasses.replace(defaults.engine, model=args.model, load_format=args.load_format,
                                 kv_cache_memory_bytes=args.kv_cache_bytes,
                                 max_model_len=args.max_model_len,
                                 kv_cache_dtype=args.kv_cache_dtype)
    return WorkerConfig(role=args.role, host=args.host, port=args.port,
                        worker_id=args.worker_id, engine=engine, redis_url=args.redis_url,
                        redis_namespace=args.redis_namespace, advertise_address=args.advertise,
                        test_kv_push_pause_s=defaults.test_kv_push_pause_s)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    return run_service(lambda: serve(config), stop)


if __name__ == "__main__":
    raise SystemExit(main())
