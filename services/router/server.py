"""The router: finds workers in the Redis registry, weighs each prefill worker's cached prefix
(Redis prefix index) against its load, picks the decode worker with the most room, and drives
the request (protos/pagewire/v1/router.proto). Redis away means load-only routing on the last
known workers, never a stop. Policy lives in pagewire.cluster.routing; this file only moves
requests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import redis

from pagewire.cluster.prefill_placement import CostModel, PlacementConfig
from pagewire.cluster.prefix_index import PrefixIndex
from pagewire.cluster.registry import WorkerInfo, WorkerRegistry
from pagewire.cluster.routing import (
    ROUTING_POLICIES,
    RoutingWeights,
    keeps_decode,
    pick_decode_worker,
    pick_prefill_worker,
)
from pagewire.engine.prefix_hash import hash_full_blocks
from pagewire.services.grpc_errors import InvalidRequest, Unavailable, grpc_errors
from pagewire.services.grpc_options import CHANNEL_OPTIONS, KEEPALIVE_SERVER_OPTIONS
from pagewire.services.lifecycle import add_health, run_service
from pagewire.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)
PREFILL_ATTEMPTS = 2
DECODE_ATTEMPTS = 2
SUSPECT_S = 10.0  # longer than the registry's TTL: by then a dead worker's entry is gone


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50071
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_namespace: str = "pagewire"
    default_timeout_ms: int = 300_000
    """End-to-end deadline of a request that names none."""
    transfer_timeout_ms: int = 30_000
    """How long a decode worker holds a reservation for KV that has not come."""
    weights: RoutingWeights = RoutingWeights()
    policy: str = "prefix"
    """How the prefill worker is chosen: prefix (longest cached prefix against load) or
    round-robin (in turn, blind to caches: the baseline prefix-aware routing is measured
    against)."""
    placement: PlacementConfig = PlacementConfig()
    """When a disaggregated request's prompt is computed on its decode worker instead of
    moving its KV (pagewire.cluster.prefill_placement)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(ROUTING_POLICIES)}; "
                             f"got {self.policy!r}")

    @classmethod
    def from_env(cls, environ=os.environ) -> RouterConfig:
        placement = PlacementConfig(
            max_local_prefill_tokens=int(environ.get("PAGEWIRE_MAX_LOCAL_PREFILL_TOKENS", "0")),
            cost_based=environ.get("PAGEWIRE_COST_BASED_PLACEMENT", "1") not in ("0", "false"))
        return cls(host=environ.get("PAGEWIRE_ROUTER_HOST", "127.0.0.1"),
                   port=int(environ.get("PAGEWIRE_ROUTER_PORT", "50071")),
                   redis_url=environ.get("PAGEWIRE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   redis_namespace=environ.get("PAGEWIRE_REDIS_NAMESPACE", "pagewire"),
                   policy=environ.get("PAGEWIRE_ROUTING_POLICY", "prefix"), placement=placement)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig):
        self.config = config
        client = redis.Redis.from_url(config.redis_url, socket_timeout=1,
                                      socket_connect_timeout=1)
        self.client = client
        self.registry = WorkerRegistry(client, config.redis_namespace)
        self._indexes: dict[str, PrefixIndex] = {}
        self._known_workers: list[WorkerInfo] = []
        self._redis_ok = True
        self._inflight: Counter[str] = Counter()  # our own requests per worker (heartbeats lag)
        self._inflight_blocks: Counter[str] = Counter()  # their prompt blocks, per decode worker
        self._turn = 0  # round-robin policy only
        self._suspects: dict[str, float] = {}  # worker id -> until when it is skipped
        self._where: dict[str, list[worker_pb2_grpc.WorkerStub]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.costs = CostModel(config.placement)  # what prefills and transfers measured
        self.decisions: Counter[str] = Counter()

    # ---- finding and choosing workers --------------------------------------------------------

    async def _live_workers(self) -> list[WorkerInfo]:
        try:
            workers = await asyncio.to_thread(self.registry.workers)
        except redis.RedisError as exc:
            if self._redis_ok:
                logger.warning("Redis unreachable; routing by load on known workers: %s", exc)
            self._redis_ok = False
            return self._known_workers
        self._redis_ok = True
        self._known_workers = workers
        return workers

    async def _cached_blocks(self, model: str, hashes: list[int],
                             candidates: list[WorkerInfo]) -> dict[str, int]:
        if not self._redis_ok or not hashes:
            return {}
        index = self._indexes.setdefault(
            model, PrefixIndex(self.client, model, self.config.redis_namespace))
        try:
            return await asyncio.to_thread(index.longest_prefix, hashes,
                                           [w.worker_id for w in candidates])
        except redis.RedisError:
            return {}

    def _with_inflight(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """Heartbeats lag, and this router knows its own requests exactly: a worker's load is
        at least what we sent it (max, not sum: a heartbeat already counts what it saw)."""
        return [dataclasses.replace(
            w, running=max(w.running, self._inflight[w.worker_id]),
            kv_blocks_free=min(w.kv_blocks_free,
                               max(w.kv_blocks_total - self._inflight_blocks[w.worker_id], 0)))
            for w in workers]

    def _stub(self, worker: WorkerInfo) -> worker_pb2_grpc.WorkerStub:
        if worker.address not in self._channels:
            self._channels[worker.address] = grpc.aio.insecure_channel(
                worker.address, options=CHANNEL_OPTIONS)
        return worker_pb2_grpc.WorkerStub(self._channels[worker.address])

    # ---- the request --------------------------------------------------------------------------

    @grpc_errors
    async def Generate(self, request, context):
        if not request.request_id or not request.prompt_token_ids:
            raise InvalidRequest("request_id and prompt_token_ids are required")
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        workers = [w for w in await self._live_workers() if not self._is_suspect(w)]
        prefills = [w for w in workers if w.serves("prefill")]
        decodes = [w for w in workers if w.serves("decode")]
        if not prefills or not decodes:
            raise Unavailable("no live prefill and decode workers are registered")
        hashes = hash_full_blocks(prompt, decodes[0].block_size)
        # Every candidate's cached prefix: a prefill worker's saves compute, a decode worker's
        # saves a transfer (and may make computing the rest there cheaper than moving it).
        candidates = list({w.worker_id: w for w in prefills + decodes}.values())
        cached = await self._cached_blocks(prefills[0].model, hashes, candidates)
        if self.config.policy == "round-robin":
            cached = {w.worker_id: cached.get(w.worker_id, 0) for w in decodes}
        timeout = (request.timeout_ms or self.config.default_timeout_ms) / 1000
        async with asyncio.timeout(timeout):
            for attempt in range(DECODE_ATTEMPTS):
                try:
                    async for batch in self._route(rid, prompt, request.sampling, prefills,
                                                   decodes, cached, len(hashes)):
                        yield batch
                    return
                except _Unreachable as lost:  # before any token: another decode worker
                    self._suspects[lost.worker.worker_id] = time.monotonic() + SUSPECT_S
                    decodes = [w for w in decodes if w.worker_id != lost.worker.worker_id]
                    prefills = [w for w in prefills if w.worker_id != lost.worker.worker_id]
                    if not decodes or not prefills or attempt + 1 == DECODE_ATTEMPTS:
                        raise lost.error from None
                    logger.warning("decode worker %s unreachable; retrying elsewhere",
                                   lost.worker.worker_id)

    def _is_suspect(self, worker: WorkerInfo) -> bool:
        """A worker that refused a connection is skipped until the registry catches up, or
        until our channel to it connects again (it was restarted)."""
        if self._suspects.get(worker.worker_id, 0.0) <= time.monotonic():
            return False
        channel = self._channels.get(worker.address)
        if channel is not None and channel.get_state(try_to_connect=True) == \
                grpc.ChannelConnectivity.READY:
            del self._suspects[worker.worker_id]
            return False
        return True

    async def _route(self, rid, prompt, sampling, prefills, decodes, cached, num_full_blocks):
        # From the picks to the in-flight update no await: concurrent requests must each see
        # the load the ones before them added, or a burst lands on one worker.
        needed = -(-len(prompt) // decodes[0].block_size)
        prefills = self._with_inflight(prefills)
        if self.config.policy == "round-robin":
            prefill = sorted(prefills, key=lambda w: w.worker_id)[self._turn % len(prefills)]
            self._turn += 1
        else:
            prefill = pick_prefill_worker(prefills, cached, num_full_blocks, self.config.weights)
        decode = prefill if keeps_decode(prefill, needed) else pick_decode_worker(
            self._with_inflight(decodes), needed, self.config.weights)
        decision = ""
        if decode.worker_id != prefill.worker_id:
            held = min(cached.get(decode.worker_id, 0), len(prompt) // decode.block_size)
            decision = self.costs.place(prefill.worker_id, decode.worker_id,
                                        len(prompt) - held * decode.block_size, needed - held)
            if decision != "remote":
                prefill = decode  # computed where it decodes: nothing moves
            self.decisions[decision] += 1
        chosen = [decode] if decode.worker_id == prefill.worker_id else [prefill, decode]
        self._inflight.update(w.worker_id for w in chosen)
        self._inflight_blocks[decode.worker_id] += needed
        try:
            if len(chosen) == 1:  # one worker doing both: no transfer at all
                async for batch in self._colocated(rid, prompt, sampling, decode, decision,
                                                   len(prompt) - held * decode.block_size
                                                   if decision else 0):
                    yield batch
            else:
                async for batch in self._disaggregated(rid, prompt, sampling, prefill, decode,
                                                       prefills):
                    yield batch
        finally:
            self._inflight.subtract(w.worker_id for w in chosen)
            self._inflight_blocks[decode.worker_id] -= needed
            self._where.pop(rid, None)

    async def _colocated(self, rid, prompt, sampling, worker, decision="", num_computed=0):
        """The whole request on one worker: a colocated one, or a decode worker that the
        placement chose to compute the prompt itself (`decision`, of `num_computed` tokens)."""
        stub = self._stub(worker)
        self._where[rid] = [stub]
        started = time.perf_counter()
        stream = stub.Generate(worker_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling))
        try:
            first = await stream.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # no token yet: go elsewhere
                raise _Unreachable(worker, _lost(worker, exc)) from None
            raise _lost(worker, exc) from None
        if first != grpc.aio.EOF:
            if decision:  # its time to first token is that worker's prefill, as we measure it
                self.costs.observe_prefill(worker.worker_id, num_computed,
                                           time.perf_counter() - started)
                first.prefill_decision = decision
            yield first
            async for batch in _relay(stream, worker, lambda m: m):
                yield batch

    async def _disaggregated(self, rid, prompt, sampling, prefill, decode, prefills):
        decode_stub = self._stub(decode)
        stream = decode_stub.Decode(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling,
            transfer_timeout_ms=self.config.transfer_timeout_ms))
        self._where[rid] = [decode_stub]
        try:
            try:
                first = await stream.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:  # nothing reserved: go elsewhere
                    raise _Unreachable(decode, _lost(decode, exc)) from None
                raise
            if first == grpc.aio.EOF or not first.HasField("reserved"):
                raise Unavailable(f"decode worker {decode.worker_id} did not reserve")
            prefilled = await self._prefill_with_retry(rid, prompt, sampling, prefill, prefills,
                                                       decode, first.reserved)
            self.costs.observe_prefill(prefill.worker_id, prefilled.computed_tokens,
                                       prefilled.prefill_us / 1e6)
            self.costs.observe_transfer(prefill.worker_id, decode.worker_id,
                                        prefilled.kv_transport, prefilled.kv_bytes,
                                        prefilled.kv_transfer_us / 1e6, first.reserved.num_blocks)
            # The first token goes out as soon as the prefill worker has it (its KV is in the
            # decode worker's blocks by then), not after the decode worker's engine takes it.
            yield _first_batch(prompt, sampling, prefilled)
            stripped = False
            async for batch in _relay(stream, decode, lambda m: m.tokens):
                if not stripped:  # it starts with that same first token: sent already
                    stripped = True
                    if not batch.token_ids or batch.token_ids[0] != prefilled.first_token_id:
                        raise Unavailable(f"decode worker {decode.worker_id} continued from "
                                          "another first token than its prefill worker's")
                    del batch.token_ids[0]
                    if batch.logprobs:
                        del batch.logprobs[0]
                    batch.prompt_tokens = batch.cached_tokens = 0
                    if not batch.token_ids and not batch.finish_reason:
                        continue
                yield batch
        except grpc.aio.AioRpcError as exc:
            raise _lost(decode, exc) from None
        finally:
            stream.cancel()  # no-op once finished; a cancelled client aborts the decode side

    async def _prefill_with_retry(self, rid, prompt, sampling, prefill, prefills, decode,
                                  reserved):
        tried: set[str] = set()
        while True:
            tried.add(prefill.worker_id)
            try:
                return await self._stub(prefill).Prefill(worker_pb2.PrefillRequest(
                    request_id=rid, prompt_token_ids=prompt, sampling=sampling,
                    decode_worker_address=decode.address, skip_blocks=reserved.skip_blocks,
                    decode_block_ids=reserved.block_ids, decode_cache_id=reserved.cache_id,
                    timeout_ms=self.config.transfer_timeout_ms))
            except grpc.aio.AioRpcError as exc:
                others = [w for w in prefills if w.worker_id not in tried]
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not others or \
                        len(tried) >= PREFILL_ATTEMPTS:
                    raise _lost(prefill, exc) from None
                self._suspects[prefill.worker_id] = time.monotonic() + SUSPECT_S
                logger.warning("prefill worker %s failed (%s); retrying", prefill.worker_id,
                               exc.code())
                prefill = pick_prefill_worker(others, {}, 0, self.config.weights)

    @grpc_errors
    async def Abort(self, request, context):
        stubs = self._where.get(request.request_id, [])
        for stub in stubs:
            try:
                await stub.Abort(common_pb2.AbortRequest(request_id=request.request_id),
                                 timeout=2)
            except grpc.aio.AioRpcError:
                pass  # a lost worker has nothing left to free
        return common_pb2.AbortResponse(found=bool(stubs))

    @grpc_errors
    async def GetCluster(self, request, context):
        workers = await self._live_workers()
        speeds = self.costs.prefill_tokens_per_s
        links = [router_pb2.KVLink(prefill_id=p, decode_id=d, bytes_per_s=a.value,
                                   transfers=a.count,
                                   transport=self.costs.link_transport.get((p, d), ""))
                 for (p, d), a in sorted(self.costs.link_bytes_per_s.items())]
        return router_pb2.ClusterInfo(
            prefix_index_available=self._redis_ok, links=links,
            prefill_decisions=dict(self.decisions), workers=[
                router_pb2.WorkerStatus(
                    id=w.worker_id, role=w.role, address=w.address, running=w.running,
                    waiting=w.waiting, kv_blocks_free=w.kv_blocks_free,
                    kv_blocks_total=w.kv_blocks_total, served=w.served,
                    prefill_tokens_per_s=speeds[w.worker_id].value
                    if w.worker_id in speeds else 0.0, device=w.device,
                    kv_transports=[t for t in w.kv_transports.split(",") if t],
                    spec_num_drafts=w.spec_num_drafts,
                    spec_num_draft_tokens=w.spec_num_draft_tokens,
                    spec_num_accepted_tokens=w.spec_num_accepted_tokens,
                    spec_accepted_per_position=[
                        int(n) for n in w.spec_accepted_per_position.split(",") if n])
                for w in workers])


class _Unreachable(Exception):
    """A worker could not be reached before the request did anything there: safe to retry."""

    def __init__(self, worker: WorkerInfo, error: Exception):
        super().__init__(str(error))
        self.worker, self.error = worker, error


def _first_batch(prompt, sampling, prefilled) -> common_pb2.TokenBatch:
    """A disaggregated request's first token, from the prefill worker's answer, with what the
    gateway counts on a first batch (the prompt, the cache hit, the KV transfer)."""
    batch = common_pb2.TokenBatch(
        token_ids=[prefilled.first_token_id], prompt_tokens=len(prompt),
        cached_tokens=prefilled.cached_tokens, kv_transfer_bytes=prefilled.kv_bytes,
        kv_transfer_us=prefilled.kv_transfer_us, kv_transport=prefilled.kv_transport,
        prefill_decision="remote")
    if sampling.HasField("logprobs"):
        batch.logprobs.append(prefilled.first_logprobs)
    return batch


async def _relay(stream, worker: WorkerInfo, unwrap):
    try:
        while (message := await stream.read()) != grpc.aio.EOF:
            yield unwrap(message)
    except grpc.aio.AioRpcError as exc:
        raise _lost(worker, exc) from None


def _lost(worker: WorkerInfo, exc: grpc.aio.AioRpcError) -> Exception:
    """A worker's error, passed on with its own status when it is the request's fault."""
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED):
        return InvalidRequest(exc.details()) if exc.code() == grpc.StatusCode.INVALID_ARGUMENT \
            else TimeoutError(exc.details())
    return Unavailable(f"worker {worker.worker_id} at {worker.address} failed: "
                       f"{exc.code().name}: {exc.details()}")


async def serve(config: RouterConfig) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *KEEPALIVE_SERVER_OPTIONS])
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(config), server)
    await add_health(server, "pagewire.v1.Router")
    await server.start()
    server.bound_port = port
    logger.info("router serving on %s:%d", config.host, port)
    return server


def parse_args(argv: Sequence[str] | None) -> RouterConfig:
    defaults = RouterConfig.from_env()
    parser = argparse.ArgumentParser(description="pagewire router service (gRPC)")
    parser.add_argument("--host", default=defaults.host, help="env PAGEWIRE_ROUTER_HOST")
    parser.add_argument("--port", type=int, default=defaults.port,
                        help="env PAGEWIRE_ROUTER_PORT")
    parser.add_argument("--redis-url", default=defaults.redis_url, help="env PAGEWIRE_REDIS_URL")
    parser.add_argument("--redis-namespace", default=defaults.redis_namespace,
                        help="env PAGEWIRE_REDIS_NAMESPACE")
    parser.add_argument("--policy", default=defaults.policy, choices=ROUTING_POLICIES,
                        help="how prefill workers are chosen (env PAGEWIRE_ROUTING_POLICY)")
    parser.add_argument("--max-local-prefill-tokens", type=int,
                        default=defaults.placement.max_local_prefill_tokens,
                        help="compute a prompt on its decode worker when that worker lacks at "
                             "most this many of its tokens (env "
                             "PAGEWIRE_MAX_LOCAL_PREFILL_TOKENS; 0: costs alone decide)")
    parser.add_argument("--cost-based-placement", action=argparse.BooleanOptionalAction,
                        default=defaults.placement.cost_based,
                        help="also compute it there when moving its KV would cost more than "
                             "recomputing, as measured (env PAGEWIRE_COST_BASED_PLACEMENT)")
    args = parser.parse_args(argv)
    placement = dataclasses.replace(defaults.placement,
                                    max_local_prefill_tokens=args.max_local_prefill_tokens,
                                    cost_based=args.cost_based_placement)
    return dataclasses.replace(defaults, host=args.host, port=args.port,
                               redis_url=args.redis_url, redis_namespace=args.redis_namespace,
                               policy=args.policy, placement=placement)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    return run_service(lambda: serve(config), lambda server: server.stop(5))


if __name__ == "__main__":
    raise SystemExit(main())
