"""The decode worker's side of a KV transfer: the transports it offers, the reservations that
wait for KV, and the checks a PushKV passes before anything reaches the engine.

A reservation is a transaction. Decode holds it, bounded by its transfer timeout, until a
PushKV for it commits. PushKV refuses a header for another layout, another cache (a sender that
mapped this worker's previous process), other blocks than the reserved ones, or a transport not
offered, before a byte is written. Direct transports write into the reserved blocks themselves,
so while one may be writing (from its accepted header until its stream ends) the reservation's
blocks are never freed: a reservation that ends meanwhile is freed once the stream is over, and
its blocks can never be handed to another request under a late write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass

import torch

from pagewire.engine.async_engine import AsyncEngine
from pagewire.engine.kv_transfer import KV_DTYPES, KVLayout
from pagewire.kv_transport import DIRECT_TRANSPORTS, FALLBACK
from pagewire.kv_transport.nixl_agent import NixlEndpoint
from pagewire.kv_transport.shared_memory import SharedMemoryFolder
from pagewire.services.grpc_errors import InvalidRequest, NotFound
from pagewire.v1 import worker_pb2

logger = logging.getLogger(__name__)


class TruncatedTransfer(InvalidRequest):
    """A KV transfer that ended before all the blocks its header declares (or, written in
    place, before its commit): its sender was killed or cut off mid-way (gRPC shows a dead
    client's stream as a clean end). The reservation outlives it, for a retry from another
    prefill worker, bounded by its transfer timeout and by the Decode call that holds it."""


@dataclass
class Reservation:
    skip_blocks: int
    block_ids: list[int]
    arrived: asyncio.Future  # (header, layout, blocks or None when written in place)
    writing: asyncio.Event | None = None  # set once no direct write can be in flight


class KVReceiver:
    def __init__(self, engine: AsyncEngine, transports: tuple[str, ...],
                 shm: SharedMemoryFolder | None = None, nixl: NixlEndpoint | None = None):
        self.engine = engine
        self.transports = transports
        self.shm = shm
        self.nixl = nixl
        self.cache_id = secrets.token_hex(8)  # a restart makes another: senders shake again
        self._reservations: dict[str, Reservation] = {}
        self._cleanups: set[asyncio.Task] = set()
        self._cuda_ipc_handle: bytes | None = None

    @property
    def layout(self) -> KVLayout:
        return self.engine.engine.kv_layout

    # ---- the handshake ------------------------------------------------------------------------

    def checked_layout(self, message) -> KVLayout:
        """The layout a handshake or header declares; refused unless it is this cache's."""
        if message.dtype not in KV_DTYPES:
            raise InvalidRequest(f"unknown KV dtype {message.dtype!r}")
        layout = KVLayout(message.model, message.dtype, message.block_size, message.num_layers,
                          message.num_kv_heads, message.head_dim)
        self.layout.check_matches(layout)  # immutable: safe off the engine thread
        return layout

    def offers(self) -> set[str]:
        """The transports this worker can receive on."""
        runner = self.engine.engine.runner
        offered = {FALLBACK}
        if "shm" in self.transports and self.shm is not None and runner.kv_cache_file:
            offered.add("shm")
        if "cuda_ipc" in self.transports and runner.kv_cache.is_cuda:
            offered.add("cuda_ipc")
        if "nixl" in self.transports and self.nixl is not None:
            offered.add("nixl")
        return offered

    def handshake(self, request) -> worker_pb2.KVHandshakeResponse:
        self.checked_layout(request)  # a mismatch is refused here, before any request's KV
        runner = self.engine.engine.runner
        response = worker_pb2.KVHandshakeResponse(cache_id=self.cache_id,
                                                  num_blocks=runner.kv_cache.shape[2])
        wanted = self.offers() & set(request.transports)
        if "shm" in wanted:
            response.shm.CopyFrom(worker_pb2.ShmOffer(
                probe_name=self.shm.probe_name, probe_token=self.shm.probe_token,
                cache_file=runner.kv_cache_file,
                cache_bytes=runner.kv_cache.numel() * runner.kv_cache.element_size()))
        if "cuda_ipc" in wanted:
            response.cuda_ipc_handle = self._cuda_ipc_offer()
        if "nixl" in wanted:
            response.nixl_offer = self.nixl.offer()
        return response

    def _cuda_ipc_offer(self) -> bytes:
        """The cache's CUDA IPC handle, made once; empty (not offered) where it cannot be."""
        if self._cuda_ipc_handle is None:
            from pagewire.kv_transport.cuda_ipc import export_handle  # CUDA only
            try:
                self._cuda_ipc_handle = export_handle(self.engine.engine.runner.kv_cache)
            except Exception as exc:  # noqa: BLE001 - torch's and the driver's own errors
                logger.warning("no CUDA IPC KV transport: %r", exc)
                self._cuda_ipc_handle = b""
        return self._cuda_ipc_handle

    # ---- reservations -------------------------------------------------------------------------

    async def reserve(self, rid: str, prompt: list[int], params) -> worker_pb2.Reserved:
        def reserve(e):
            skip = e.reserve_kv(rid, prompt, params)
            return skip, e.reserved_block_ids(rid)

        call = asyncio.ensure_future(self.engine.call(reserve))
        try:
            skip, block_ids = await asyncio.shield(call)
        except asyncio.CancelledError:  # the Decode call is gone: free what the engine holds
            await asyncio.wait([call])
            if not call.cancelled() and call.exception() is None:
                await self.engine.call(lambda e: e.abort_request(rid))
            raise
        future = asyncio.get_running_loop().create_future()
        self._reservations[rid] = Reservation(skip, block_ids, future)
        return worker_pb2.Reserved(skip_blocks=skip, num_blocks=len(block_ids),
                                   block_ids=block_ids, cache_id=self.cache_id)

    async def wait(self, rid: str, timeout_s: float):
        """(header, layout, blocks or None) once a PushKV commits the reservation's KV."""
        try:
            return await asyncio.wait_for(self._reservations[rid].arrived, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no KV arrived for {rid!r} within {timeout_s:.1f} s") from None

    async def end(self, rid: str, committed: bool) -> None:
        """Forgets a reservation. Uncommitted, its blocks are freed: now, or once a direct
        write that may still be landing in them is over."""
        reservation = self._reservations.pop(rid, None)
        if committed or reservation is None:
            return
        if reservation.writing is None or reservation.writing.is_set():
            await self.engine.call(lambda e: e.abort_request(rid))
            return
        logger.warning("%r ended while its KV was being written: its blocks are freed once "
                       "the writer is done", rid)

        async def free_after_writer() -> None:
            await reservation.writing.wait()
            await self.engine.call(lambda e: e.abort_request(rid))

        task = asyncio.get_running_loop().create_task(free_after_writer())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def cancel(self, rid: str) -> bool:
        """Fails a waiting reservation (an Abort); its Decode call then ends it."""
        reservation = self._reservations.get(rid)
        if reservation is None:
            return False
        if not reservation.arrived.done():
            reservation.arrived.set_exception(ConnectionAbortedError(f"{rid!r} was aborted"))
        return True

    # ---- PushKV -------------------------------------------------------------------------------

    async def receive(self, chunks):
        """PushKV: yields `ready` once the header is accepted, then the final count."""
        header = reservation = writing = None
        parts: list[bytes] = []
        committed, received = False, 0
        progress = contextlib.ExitStack()
        try:
            async for chunk in chunks:
                part = chunk.WhichOneof("part")
                if part == "header":
                    if header is not None:
                        raise InvalidRequest("a second KV header in one transfer")
                    header = chunk.header
                    reservation = self._reservation_for(header)
                    layout = self._accept(header, reservation)
                    if header.transport in DIRECT_TRANSPORTS:
                        writing = reservation.writing = asyncio.Event()
                    if header.transport == "nixl":  # the writes need our side's progress
                        progress.enter_context(self.nixl.receiving())
                    yield worker_pb2.PushKVResponse(ready=True)
                elif header is None:
                    raise InvalidRequest("KV before the KV header")
                elif part == "blocks" and writing is None:
                    received += len(chunk.blocks.data)
                    if received > header.num_blocks * layout.block_bytes:  # never buffered
                        raise InvalidRequest(f"the transfer holds over the {header.num_blocks} "
                                             "blocks its header declares")
                    parts.append(chunk.blocks.data)
                elif part == "commit" and writing is not None:
                    committed = True
                    if chunk.commit.HasField("first_token_id"):  # streamed: known only now
                        header.first_token_id = chunk.commit.first_token_id
                        header.first_logprobs.CopyFrom(chunk.commit.first_logprobs)
                        header.cached_tokens = chunk.commit.cached_tokens
                else:
                    raise InvalidRequest(f"a KV {part} message in a {header.transport!r} "
                                         "transfer")
            if header is None:
                raise InvalidRequest("an empty KV transfer")
            if writing is not None and not committed:
                raise TruncatedTransfer("the KV transfer ended before its commit")
            # Joining and (on CUDA) pinning a prompt's KV, ~100 MB for 1k tokens of an 8B
            # model, runs on a thread: not on the event loop that streams everyone's tokens,
            # nor on the engine thread, which then only queues the copy to the device.
            blocks = None if writing is not None else \
                await asyncio.to_thread(self._joined_blocks, header, layout, parts)
        except TruncatedTransfer:
            raise  # its sender died mid-way: the reservation waits for the router's retry
        except Exception as exc:  # a wrong transfer fails the waiting Decode with its reason
            if reservation is not None and not reservation.arrived.done():
                reservation.arrived.set_exception(exc)
            raise
        finally:
            progress.close()
            if writing is not None:
                writing.set()  # no write of this sender can land any more
        if reservation.arrived.done():  # the reservation timed out or was aborted meanwhile
            raise NotFound(f"the reservation for {header.request_id!r} has ended")
        reservation.arrived.set_result((header, layout, blocks))
        yield worker_pb2.PushKVResponse(num_blocks=header.num_blocks)

    def _reservation_for(self, header) -> Reservation:
        reservation = self._reservations.get(header.request_id)
        if reservation is None or reservation.arrived.done():
            raise NotFound(f"no reservation awaits KV for {header.request_id!r}")
        if reservation.writing is not None and not reservation.writing.is_set():
            # Refused without failing the reservation: the other writer may well commit.
            raise InvalidRequest(f"another transfer is writing {header.request_id!r}")
        return reservation

    def _accept(self, header, reservation: Reservation) -> KVLayout:
        """The header's layout once every check passed; raises (and the caller fails the
        reservation with the reason) otherwise."""
        layout = self.checked_layout(header)
        transport = header.transport or FALLBACK
        if transport not in self.offers():
            raise InvalidRequest(f"KV over {transport!r}, which this worker does not offer")
        if header.skip_blocks != reservation.skip_blocks:
            raise InvalidRequest(f"the KV skips {header.skip_blocks} blocks; the reservation "
                                 f"holds {reservation.skip_blocks}")
        if transport in DIRECT_TRANSPORTS:
            if header.cache_id != self.cache_id:
                raise InvalidRequest(f"KV written for cache {header.cache_id!r}; this worker's "
                                     f"is {self.cache_id!r} (shake hands again)")
            if list(header.block_ids) != reservation.block_ids or \
                    header.num_blocks != len(reservation.block_ids):
                raise InvalidRequest("the KV header names other blocks than the reserved ones")
        return layout

    def _joined_blocks(self, header, layout: KVLayout, parts: list[bytes]) -> torch.Tensor:
        data = b"".join(parts)
        if len(data) < header.num_blocks * layout.block_bytes:
            raise TruncatedTransfer(f"the transfer ended after {len(data)} bytes of the "
                                    f"{header.num_blocks} blocks of {layout.block_bytes} its "
                                    "header declares")
        dtype = KV_DTYPES[header.dtype]
        if not data:  # every block already cached on this side (frombuffer refuses b"")
            return torch.empty(0, *layout.block_shape, dtype=dtype)
        blocks = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        blocks = blocks.view(dtype).view(header.num_blocks, *layout.block_shape)
        if self.engine.engine.runner.device.type == "cuda":
            blocks = blocks.pin_memory()
        return blocks
