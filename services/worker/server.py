"""The worker service: a thin grpc.aio layer over AsyncEngine (protos/pagewire/v1/worker.proto).

A disaggregated request is a transaction (worker.proto says how): Decode reserves blocks and
waits, bounded by its transfer timeout, for the KV that the prefill worker pushes with PushKV.
The two sides of a transfer live beside this file: kv_push.py (the prefill worker's: the
handshake and the transport it picks) and kv_receive.py (the decode worker's: the offers, the
reservations, the checks before anything reaches the engine). Every failure or cancellation
aborts the request on this worker, which frees its blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

import grpc

from pagewire.config import KV_CACHE_DTYPES, LOAD_FORMATS
from pagewire.engine.async_engine import AsyncEngine
from pagewire.engine.llm_engine import LLMEngine
from pagewire.kv_transport import KV_TRANSPORTS
from pagewire.kv_transport.nixl_agent import NixlEndpoint, nixl_available
from pagewire.kv_transport.shared_memory import SharedMemoryFolder
from pagewire.model.quantization import METHODS as QUANTIZATION_METHODS
from pagewire.services.grpc_errors import (
    Aborted,
    FailedPrecondition,
    InvalidRequest,
    grpc_errors,
)
from pagewire.services.grpc_options import KEEPALIVE_SERVER_OPTIONS
from pagewire.services.lifecycle import add_health, run_service
from pagewire.services.worker.announcer import Announcer
from pagewire.services.worker.config import WorkerConfig, advertised_address, transport_names
from pagewire.services.worker.convert import sampling_from_proto, token_batch, token_logprobs
from pagewire.services.worker.kv_push import KVPusher, PushResult, finish_even_if_cancelled
from pagewire.services.worker.kv_receive import KVReceiver
from pagewire.v1 import common_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, config: WorkerConfig, worker_id: str,
                 pusher: KVPusher, receiver: KVReceiver):
        self.engine = engine
        self.config = config
        self.worker_id = worker_id
        self.served = 0
        self.pusher = pusher  # the prefill side of KV transfers (kv_push.py)
        self.receiver = receiver  # the decode side (kv_receive.py)

    def _require(self, role: str) -> None:
        if self.config.role not in (role, "both"):
            raise FailedPrecondition(f"this worker's role is {self.config.role}, not {role}")

    # ---- prefill role -------------------------------------------------------------------------

    @grpc_errors
    async def Prefill(self, request, context):
        self._require("prefill")
        rid, prompt = _request_id(request), list(request.prompt_token_ids)
        params = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1)
        address = request.decode_worker_address
        if not address:
            raise InvalidRequest("decode_worker_address is empty")
        timeout = request.timeout_ms / 1000 or DEFAULT_TIMEOUT_S
        deadline = time.monotonic() + timeout
        # A bad request is refused before a transfer opens (its grammar compiles here, once).
        await asyncio.to_thread(self.engine.engine.check_request, prompt, params)
        try:
            async with asyncio.timeout(timeout):
                # Before computing anything: a refused layout costs no prefill.
                peer = await self.pusher.peer(address, request.decode_cache_id)
                started = time.perf_counter()
                if peer.stream is not None:
                    final, pushed = await self._prefill_streaming(rid, prompt, params, address,
                                                                  peer, request, deadline)
                    prefill_us = int((time.perf_counter() - started) * 1e6)
                else:
                    final = await self._prefill(rid, prompt, params)
                    prefill_us = int((time.perf_counter() - started) * 1e6)
                    header = self._kv_header(rid, request.skip_blocks, final)
                    pushed = await self._push_bytes(rid, address, header, request.skip_blocks)
        finally:  # the held blocks, once nothing reads them any more
            await self.engine.call(lambda e: e.abort_request(rid))
        self.served += 1
        completion = final.outputs[0]
        response = worker_pb2.PrefillResponse(
            first_token_id=completion.token_ids[0], cached_tokens=final.num_cached_tokens,
            kv_bytes=pushed.kv_bytes, kv_transfer_us=pushed.transfer_us,
            kv_transport=pushed.transport, prefill_us=prefill_us,
            computed_tokens=len(prompt) - final.num_cached_tokens)
        if completion.logprobs:
            response.first_logprobs.CopyFrom(token_logprobs(completion.token_ids[0],
                                                            completion.logprobs[0]))
        return response

    async def _prefill(self, rid, prompt, params, kv_sink=None):
        """Runs the prompt, holding its blocks; its final output (the first token)."""
        final = None
        async for output in self.engine.stream(
                rid, lambda e: e.add_request(rid, prompt, params, hold_kv=True,
                                             kv_sink=kv_sink)):
            final = output
        if final.outputs[0].finish_reason == "abort":
            raise Aborted(f"{rid!r} was aborted during its prefill")
        return final

    async def _prefill_streaming(self, rid, prompt, params, address, peer, request, deadline):
        """The prompt's blocks go into the decode worker's reserved blocks as its chunks are
        computed (a BlockStream of the peer's transport), the PushKV stream open from before
        the first chunk to the commit; (the final output, the push's result)."""
        layout = self.engine.engine.kv_layout
        dst_ids = list(request.decode_block_ids)
        header = worker_pb2.KVHeader(
            request_id=rid, model=layout.model, dtype=layout.dtype,
            block_size=layout.block_size, num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_tokens=len(prompt),
            skip_blocks=request.skip_blocks, num_blocks=len(dst_ids))
        if request.skip_blocks + len(dst_ids) != -(-len(prompt) // layout.block_size):
            raise InvalidRequest(f"{len(dst_ids)} decode_block_ids after skip_blocks="
                                 f"{request.skip_blocks} do not hold {len(prompt)} tokens")
        streamer = peer.stream(dst_ids, request.skip_blocks,
                               max(deadline - time.monotonic(), 0.0))
        call = await self.pusher.open_direct(peer, address, header, dst_ids)
        try:
            try:
                final = await self._prefill(rid, prompt, params, streamer)
            finally:
                # Nothing more is copied after this; then every copy made has landed, before
                # the stream can end (the decode worker frees the blocks once it has).
                streamer.stop()
                await finish_even_if_cancelled(asyncio.to_thread(streamer.wait))
            if streamer.error is not None:
                raise streamer.error
            if not streamer.complete:
                raise Aborted(f"{rid!r}: {streamer.num_sent} of {len(dst_ids)} blocks sent")
            completion = final.outputs[0]
            commit = worker_pb2.KVCommit(kv_bytes=streamer.num_bytes,
                                         first_token_id=completion.token_ids[0],
                                         cached_tokens=final.num_cached_tokens)
            if completion.logprobs:
                commit.first_logprobs.CopyFrom(token_logprobs(completion.token_ids[0],
                                                              completion.logprobs[0]))
            await self.pusher.commit(call, address, commit)
        finally:
            call.cancel()  # no-op once committed
        return final, PushResult(streamer.num_bytes, int(streamer.seconds * 1e6),
                                 peer.transport)

    async def _push_bytes(self, rid: str, address: str, header, skip_blocks: int):
        try:
            export = await self.engine.call(lambda e: e.start_kv_export(rid, skip_blocks))
        finally:  # the copy is queued ahead of any later step (or failed): free the blocks
            await self.engine.call(lambda e: e.abort_request(rid))
        # Waited for here, off the engine thread: the next batch is not held up.
        blocks = await asyncio.to_thread(export.wait)
        header.num_tokens, header.num_blocks = export.num_tokens, blocks.shape[0]
        return await self.pusher.push_bytes(address, header, blocks)

    def _kv_header(self, rid, skip_blocks, output) -> worker_pb2.KVHeader:
        layout = self.engine.engine.kv_layout
        header = worker_pb2.KVHeader(
            request_id=rid, model=layout.model, dtype=layout.dtype,
            block_size=layout.block_size, num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, skip_blocks=skip_blocks,
            first_token_id=output.outputs[0].token_ids[0], cached_tokens=output.num_cached_tokens)
        if output.outputs[0].logprobs:
            header.first_logprobs.CopyFrom(token_logprobs(output.outputs[0].token_ids[0],
                                                             output.outputs[0].logprobs[0]))
        return header

    # ---- decode role --------------------------------------------------------------------------

    @grpc_errors
    async def Decode(self, request, context):
        self._require("decode")
        rid, prompt = _request_id(request), list(request.prompt_token_ids)
        params = sampling_from_proto(request.sampling)
        reserved = await self.receiver.reserve(rid, prompt, params)
        committed = False
        try:
            yield worker_pb2.DecodeResponse(reserved=reserved)
            timeout = request.transfer_timeout_ms / 1000 or DEFAULT_TIMEOUT_S
            header, layout, blocks = await self.receiver.wait(rid, timeout)
            committed = True
        finally:  # uncommitted: the reservation's blocks are freed (after any write in flight)
            await self.receiver.end(rid, committed)

        first = header.first_logprobs
        first_logprobs = [((header.first_token_id, first.logprob),
                           [(top.token_id, top.logprob) for top in first.top])]

        def submit(e: LLMEngine):  # blocks=None: already written into the reserved blocks
            return e.import_kv_blocks(rid, prompt, [header.first_token_id], layout,
                                      header.num_tokens, header.skip_blocks, blocks, params,
                                      header.cached_tokens, first_logprobs,
                                      num_blocks=header.num_blocks)

        num_sent = 0
        async for output in self.engine.stream(rid, submit):
            yield worker_pb2.DecodeResponse(tokens=token_batch(output, num_sent))
            num_sent = len(output.outputs[0].token_ids)
        self.served += 1

    @grpc_errors
    async def KVHandshake(self, request, context):
        self._require("decode")
        return self.receiver.handshake(request)

    @grpc_errors
    async def PushKV(self, request_iterator, context):
        self._require("decode")
        async for reply in self.receiver.receive(request_iterator):
            yield reply

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
        if self.receiver.cancel(rid):  # a reservation: its Decode call frees it
            return common_pb2.AbortResponse(found=True)
        output = await self.engine.abort(rid)
        return common_pb2.AbortResponse(found=output is not None)

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

    # The port is bound first (it serves once started, below): loading the engine takes
    # seconds, in which another process's bind(0) (a NIXL agent's UCX listeners) could take it.
    limit = config.max_message_bytes
    server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                      ("grpc.max_receive_message_length", limit),
                                      ("grpc.so_reuseport", 0), *KEEPALIVE_SERVER_OPTIONS])
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    shm = _shared_memory_folder(config)
    engine_config = config.engine
    if shm is not None and config.role != "prefill":  # a receiver's cache, in shared memory
        engine_config = engine_config.replace(kv_cache_shared_dir=config.shm_dir)
    engine = AsyncEngine(await asyncio.to_thread(LLMEngine, engine_config),
                         on_death=engine_died).start()
    address = advertised_address(config, port)
    worker_id = config.worker_id or f"{config.role}@{address}"  # unique per replica
    receiver = KVReceiver(engine, config.kv_transports, shm)
    receiver.nixl = await asyncio.to_thread(_nixl_endpoint, config, engine,
                                            f"{worker_id}/{receiver.cache_id}")
    pusher = KVPusher(engine, config.kv_transports, config.kv_chunk_bytes, limit, shm,
                      receiver.nixl, config.test_kv_push_pause_s)
    servicer = WorkerServicer(engine, config, worker_id, pusher, receiver)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    await add_health(server, "pagewire.v1.Worker")
    await server.start()
    server.bound_port = port
    server.async_engine = engine
    server.fatal = fatal
    server.announcer = None
    server.servicer = servicer
    if config.redis_url:
        server.announcer = Announcer(engine, config.redis_url, worker_id, config.role, address,
                                     served=lambda: servicer.served,
                                     namespace=config.redis_namespace,
                                     device=_device_name(engine.engine.runner.device),
                                     kv_transports="" if config.role == "prefill" else
                                     ",".join(sorted(receiver.offers())))
        await server.announcer.announce_once()
        server.announcer.start()
    logger.info("%s serving on %s:%d (KV transports in: %s)", worker_id, config.host, port,
                ", ".join(sorted(receiver.offers())))
    return server


def _device_name(device) -> str:
    if device.type != "cuda":
        return device.type
    import torch

    return f"cuda {torch.cuda.get_device_name(device)}"


def _shared_memory_folder(config: WorkerConfig) -> SharedMemoryFolder | None:
    if "shm" not in config.kv_transports or config.engine.device != "cpu":
        return None
    folder = SharedMemoryFolder(config.shm_dir)
    return folder if folder.open() else None


def _nixl_endpoint(config: WorkerConfig, engine: AsyncEngine, name: str) -> NixlEndpoint | None:
    if "nixl" not in config.kv_transports:
        return None
    if not nixl_available():
        logger.info("no NIXL KV transport: the nixl package is not installed")
        return None
    try:
        return NixlEndpoint(name, engine.engine.runner.kv_cache)
    except Exception as exc:  # noqa: BLE001 - NIXL's own error types; the worker serves on
        logger.warning("no NIXL KV transport: its agent did not start (%r)", exc)
        return None


async def stop(server: grpc.aio.Server, grace_s: float = 5.0) -> None:
    if server.announcer is not None:
        await server.announcer.stop()
    await server.stop(grace_s)
    await server.async_engine.stop()
    servicer = server.servicer
    servicer.pusher.close()
    if servicer.receiver.nixl is not None:
        servicer.receiver.nixl.close()
    shm = servicer.receiver.shm
    if shm is not None:
        cache_file = server.async_engine.engine.runner.kv_cache_file
        if cache_file:
            shm.remove(cache_file)
        shm.close()


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
    parser.add_argument("--quantization", default=defaults.engine.quantization,
                        choices=QUANTIZATION_METHODS,
                        help="quantize the weights at load: fp8 (env PAGEWIRE_QUANTIZATION)")
    parser.add_argument("--tensor-parallel-size", type=int,
                        default=defaults.engine.tensor_parallel_size,
                        help="processes (one GPU each on CUDA) holding a slice of every layer; "
                             "KV then moves over gRPC (env PAGEWIRE_TENSOR_PARALLEL_SIZE)")
    parser.add_argument("--pipeline-parallel-size", type=int,
                        default=defaults.engine.pipeline_parallel_size,
                        help="pipeline stages of consecutive layers, each of "
                             "--tensor-parallel-size processes; KV then moves over gRPC (env "
                             "PAGEWIRE_PIPELINE_PARALLEL_SIZE)")
    parser.add_argument("--speculative-config", default=defaults.engine.speculative_config,
                        help='speculative decoding, as JSON: {"method": "ngram", '
                             '"num_speculative_tokens": 4} or {"method": "draft_model", '
                             '"model": PATH, "num_speculative_tokens": 3} (decode and colocated '
                             'workers; env PAGEWIRE_SPECULATIVE_CONFIG)')
    parser.add_argument("--redis-url", default=defaults.redis_url,
                        help="registry and prefix index (env PAGEWIRE_REDIS_URL)")
    parser.add_argument("--redis-namespace", default=defaults.redis_namespace,
                        help="key prefix shared with the router (env PAGEWIRE_REDIS_NAMESPACE)")
    parser.add_argument("--kv-transports", default=",".join(defaults.kv_transports),
                        help="KV transports this worker may use, fastest first, from "
                             f"{','.join(KV_TRANSPORTS)}; gRPC bytes stay the fallback "
                             "(env PAGEWIRE_KV_TRANSPORTS)")
    parser.add_argument("--shm-dir", default=defaults.shm_dir,
                        help="tmpfs folder of the shared-memory KV transport (env "
                             "PAGEWIRE_SHM_DIR)")
    parser.add_argument("--advertise", default=defaults.advertise_address,
                        help="host:port others reach this worker at (env "
                             "PAGEWIRE_WORKER_ADVERTISE)")
    args = parser.parse_args(argv)
    engine = dataclasses.replace(defaults.engine, model=args.model, load_format=args.load_format,
                                 kv_cache_memory_bytes=args.kv_cache_bytes,
                                 max_model_len=args.max_model_len,
                                 kv_cache_dtype=args.kv_cache_dtype,
                                 speculative_config=args.speculative_config,
                                 quantization=args.quantization,
                                 tensor_parallel_size=args.tensor_parallel_size,
                                 pipeline_parallel_size=args.pipeline_parallel_size)
    return WorkerConfig(role=args.role, host=args.host, port=args.port,
                        worker_id=args.worker_id, engine=engine, redis_url=args.redis_url,
                        redis_namespace=args.redis_namespace, advertise_address=args.advertise,
                        kv_transports=transport_names(args.kv_transports), shm_dir=args.shm_dir,
                        test_kv_push_pause_s=defaults.test_kv_push_pause_s)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    return run_service(lambda: serve(config), stop)


if __name__ == "__main__":
    raise SystemExit(main())
