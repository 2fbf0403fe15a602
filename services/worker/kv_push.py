"""The prefill worker's side of a KV transfer: which transport to each decode worker, and the
push itself (worker.proto says how the transaction goes).

One handshake per decode worker process: its answer offers transports, and the first of ours
that we can open is kept with the cache it leads to (a mapped shm file, a CUDA IPC mapping, a
NIXL peer). A decode worker that restarts at the same address has a new cache id; a request
naming it makes us shake hands again, so nothing is ever written through a stale mapping.

Direct transports write into the decode worker's reserved blocks while the prompt's blocks
are still held here; the blocks are released only once the write is over, and the PushKV
stream stays open until then even when the request is cancelled, because the decode worker
frees its reserved blocks only once the stream has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from pagewire.engine.async_engine import AsyncEngine
from pagewire.engine.kv_transfer import KVLayout
from pagewire.kv_transport import FALLBACK
from pagewire.kv_transport.block_stream import BlockStream
from pagewire.kv_transport.mapped_cache import BlockStreamer, check_peer_cache
from pagewire.kv_transport.nixl_agent import NixlEndpoint
from pagewire.kv_transport.nixl_stream import NixlStreamer
from pagewire.kv_transport.shared_memory import SharedMemoryFolder
from pagewire.services.grpc_errors import Aborted, InvalidRequest, NotFound
from pagewire.services.grpc_options import CHANNEL_OPTIONS
from pagewire.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class Peer:
    """A decode worker process as one handshake found it."""

    cache_id: str
    transport: str
    # direct transports: (dst block ids, skip_blocks, timeout_s) -> the KV sink that the engine
    # streams the prompt's blocks through, into the peer's reserved blocks
    stream: Callable[[list[int], int, float], BlockStream] | None = None
    close: Callable[[], None] = field(default=lambda: None)


@dataclass(frozen=True)
class PushResult:
    kv_bytes: int
    transfer_us: int  # the bytes' time on the move (PrefillResponse.kv_transfer_us)
    transport: str


class KVPusher:
    def __init__(self, engine: AsyncEngine, transports: tuple[str, ...], kv_chunk_bytes: int,
                 max_message_bytes: int, shm: SharedMemoryFolder | None = None,
                 nixl: NixlEndpoint | None = None, test_pause_s: float = 0.0):
        self.engine = engine
        self.transports = transports
        self.kv_chunk_bytes = kv_chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.shm = shm
        self.nixl = nixl
        self.test_pause_s = test_pause_s
        self._peers: dict[str, Peer] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def layout(self) -> KVLayout:
        return self.engine.engine.kv_layout

    @property
    def cache(self) -> torch.Tensor:
        return self.engine.engine.runner.kv_cache

    # ---- the handshake ------------------------------------------------------------------------

    async def peer(self, address: str, cache_id: str = "") -> Peer:
        """The decode worker at `address`, shaking hands when it is new or has restarted."""
        known = self._peers.get(address)
        if known is not None and (not cache_id or known.cache_id == cache_id):
            return known
        self.forget(address)
        layout = self.layout
        request = worker_pb2.KVHandshakeRequest(
            model=layout.model, dtype=layout.dtype, block_size=layout.block_size,
            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim, transports=self.transports)
        try:
            offer = await self.stub(address).KVHandshake(request, timeout=HANDSHAKE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise push_failed(address, exc) from None
        peer = await asyncio.to_thread(self._open, offer)
        self._peers[address] = peer
        logger.info("KV transport to %s: %s", address, peer.transport)
        return peer

    def forget(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.close()

    def _open(self, offer) -> Peer:
        """The first of our transports that the offer allows and that opens here."""
        for name in self.transports:
            if name == FALLBACK:
                break
            try:
                opened = getattr(self, f"_open_{name}")(offer)
            except Exception as exc:  # noqa: BLE001 - any failure means: not this transport
                logger.info("KV transport %s not usable with this peer: %s", name, exc)
                continue
            if opened is not None:
                return opened
        return Peer(offer.cache_id, FALLBACK)

    def _peer_shape(self, offer) -> tuple[int, ...]:
        layout = self.layout
        return (layout.num_layers, 2, offer.num_blocks, layout.block_size, layout.num_kv_heads,
                layout.head_dim)

    def _open_shm(self, offer) -> Peer | None:
        shm = offer.shm
        if self.shm is None or self.cache.is_cuda or not shm.cache_file or \
                not self.shm.holds_probe(shm.probe_name, shm.probe_token):
            return None  # not one folder: another host, or private /dev/shm folders
        data = self.shm.open_cache(shm.cache_file, shm.cache_bytes)
        return self._mapped_peer(offer, "shm", data.view(self.cache.dtype))

    def _open_cuda_ipc(self, offer) -> Peer | None:
        if not offer.cuda_ipc_handle or not self.cache.is_cuda:
            return None
        from pagewire.kv_transport.cuda_ipc import open_handle  # CUDA only
        return self._mapped_peer(offer, "cuda_ipc",
                                 open_handle(offer.cuda_ipc_handle, self.cache.device))

    def _mapped_peer(self, offer, transport: str, data: torch.Tensor) -> Peer:
        peer_cache = data.view(self._peer_shape(offer))
        check_peer_cache(self.cache, peer_cache)
        return Peer(offer.cache_id, transport, stream=lambda dst_ids, skip_blocks, timeout_s:
                    BlockStreamer(peer_cache, dst_ids, skip_blocks))

    def _open_nixl(self, offer) -> Peer | None:
        if self.nixl is None or not offer.nixl_offer:
            return None
        nixl, peer = self.nixl, self.nixl.connect(offer.nixl_offer)
        return Peer(offer.cache_id, "nixl", stream=lambda dst_ids, skip_blocks, timeout_s:
                    NixlStreamer(nixl, peer, dst_ids, skip_blocks, timeout_s),
                    close=lambda: nixl.forget(peer))

    # ---- the push -----------------------------------------------------------------------------

    async def open_direct(self, peer: Peer, address: str, header, dst_ids: list[int]):
        """Opens a PushKV for a direct write: the header, then the decode worker's `ready`
        (only then may a byte be written). Returns the open call; `commit` ends it."""
        header.transport, header.cache_id = peer.transport, peer.cache_id
        header.block_ids[:] = dst_ids
        call = self.stub(address).PushKV()
        try:
            await call.write(worker_pb2.KVChunk(header=header))
            await self._expect_ready(call, address)
            await self._test_pause(header.request_id, address, peer.transport, messages=2)
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            self.forget(address)  # a restarted peer may offer other transports
            raise push_failed(address, exc) from None
        except BaseException:
            call.cancel()
            raise
        return call

    async def commit(self, call, address: str, commit: worker_pb2.KVCommit) -> None:
        """Tells the decode worker every block is written, and waits for its count."""
        try:
            await call.write(worker_pb2.KVChunk(commit=commit))
            await call.done_writing()
            await self._expect_done(call, address)
        except grpc.aio.AioRpcError as exc:
            self.forget(address)
            raise push_failed(address, exc) from None

    async def push_bytes(self, address: str, header, blocks: torch.Tensor) -> PushResult:
        """Sends the header and the blocks as gRPC messages (blocks already on the host)."""
        header.transport = FALLBACK
        start = time.perf_counter()
        call = self.stub(address).PushKV(self._chunks(address, header, blocks))
        try:
            await self._expect_done(call, address)
        except grpc.aio.AioRpcError as exc:
            self.forget(address)
            raise push_failed(address, exc) from None
        return PushResult(blocks.numel() * blocks.element_size(),
                          int((time.perf_counter() - start) * 1e6), FALLBACK)

    async def _chunks(self, address: str, header, blocks: torch.Tensor):
        yield worker_pb2.KVChunk(header=header)
        per_message = max(1, self.kv_chunk_bytes // self.layout.block_bytes)
        for first in range(0, blocks.shape[0], per_message):
            await self._test_pause(header.request_id, address, FALLBACK, first == 0)
            data = blocks[first:first + per_message].contiguous().view(torch.uint8)
            yield worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(
                first_block=first, data=data.numpy().tobytes()))

    @staticmethod
    async def _expect_ready(call, address: str) -> None:
        reply = await call.read()
        if reply == grpc.aio.EOF or not reply.ready:
            raise Aborted(f"the decode worker at {address} did not accept the KV header")

    @staticmethod
    async def _expect_done(call, address: str) -> None:
        while (reply := await call.read()) != grpc.aio.EOF:
            if not reply.ready:
                return
        raise Aborted(f"the decode worker at {address} ended the KV transfer unanswered")

    async def _test_pause(self, rid: str, address: str, transport: str, log: bool = True,
                          messages: int = 1) -> None:
        """Fault injection for tests (WorkerConfig.test_kv_push_pause_s): a pause as long as
        `messages` gRPC messages' worth, before each message or before a direct write."""
        pause_s = self.test_pause_s * messages
        if pause_s:
            if log:
                logger.warning("test hook: KV push of %r to %s (%s) pauses %.1f s", rid,
                               address, transport, pause_s)
            await asyncio.sleep(pause_s)

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._channels:
            limit = self.max_message_bytes
            self._channels[address] = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit), *CHANNEL_OPTIONS])
        return worker_pb2_grpc.WorkerStub(self._channels[address])

    def close(self) -> None:
        for address in list(self._peers):
            self.forget(address)


async def finish_even_if_cancelled(work):
    """Awaits `work` to its end; a cancellation meanwhile is raised after it, not before."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def push_failed(address: str, exc: grpc.aio.AioRpcError) -> Exception:
    """The decode worker's refusal passed on with its own status. Anything else (the decode
    worker gone, its reservation cancelled) aborts the request, as CANCELLED, never as
    UNAVAILABLE: that would tell the router this prefill worker is lost and to retry."""
    message = f"KV push to {address} failed: {exc.code().name}: {exc.details()}"
    by_code = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
               grpc.StatusCode.NOT_FOUND: NotFound,
               grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError}
    return by_code.get(exc.code(), Aborted)(message)
