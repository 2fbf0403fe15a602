"""The NIXL KV transport: any two hosts, one copy, written straight into the reserved blocks.

NIXL (NVIDIA's inference transfer library, what vLLM, SGLang and Dynamo move KV with) runs
UCX underneath, which picks the fastest path it finds between two agents: RDMA or TCP across
hosts, shared memory or CUDA IPC on one. Every worker that offers or uses this transport has
one agent with its whole KV cache registered (CPU or GPU memory). At the handshake the decode
worker offers its agent's metadata and its cache's address and size; the prefill worker adds
it as a peer, and for each request writes its blocks into the decode worker's reserved blocks:
one region per layer, keys or values, and run of consecutive blocks (the cache's layout is
[layers, 2, num_blocks, block_size, kv_heads, head_dim]). The write is done when NIXL says so;
only then does PushKV commit it.

NIXL's own progress thread spins a whole core even when idle (measured: 4.98 s of CPU in 5 s),
so agents run without it. The sender makes progress as it polls its write; the receiver must
make progress too while a write is coming (UCX's connection set-up, and TCP's emulated puts,
need the target to answer), and does so from a thread that runs only while at least one
request's KV is being written into it (`receiving`).

`nixl` is optional (`pip install 'pagewire[nixl]'`): without it the transport is not offered.
"""

from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from pagewire.kv_transport import block_runs

POLL_S = 50e-6  # between checks of a transfer's state
# Between a receiver's progress calls. A receiver makes progress from the header on, through the
# whole prefill while its chunks stream in; at 50 us that thread took a core from the prefill on
# 2 CPU cores (TTFT +16% at 1k tokens). The writes themselves are the sender's work on one host
# (CMA); across hosts UCX's TCP needs the target's progress for each fragment.
RECEIVER_POLL_S = 1e-3


class NixlTransferError(RuntimeError):
    """NIXL reported a failed or timed-out write."""


def load_nixl():
    """NIXL's Python API, or ImportError. The `nixl` meta package picks its CUDA 12 or 13
    backend; a backend installed alone (nixl-cu12 on a CPU machine) works too."""
    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("NIXL is not installed (pip install 'pagewire[nixl]')")


def nixl_available() -> bool:
    try:
        load_nixl()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class NixlPeer:
    """A decode worker's registered cache, as its offer describes it."""

    agent_name: str
    address: int  # of block 0 of layer 0's keys
    num_blocks: int
    device_id: int  # its CUDA device, or 0 for CPU memory
    memory: str  # DRAM | VRAM


class NixlEndpoint:
    """This worker's NIXL agent, with its KV cache registered for the agent's lifetime."""

    def __init__(self, agent_name: str, cache: torch.Tensor):
        api = load_nixl()
        if not cache.is_contiguous():
            raise ValueError("NIXL registers a contiguous KV cache only")
        self.agent_name = agent_name
        self.cache = cache
        self.memory = "VRAM" if cache.is_cuda else "DRAM"
        self.device_id = (cache.device.index or 0) if cache.is_cuda else 0
        # NIXL's agent is not thread-safe in its default mode: one lock serialises our calls;
        # transfers themselves run in NIXL's progress thread meanwhile.
        self._lock = threading.Lock()
        self._agent = api.nixl_agent(agent_name, api.nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"]))
        self._registration = self._agent.register_memory(cache)
        self._receiving = 0  # writes expected into this cache now (guarded by _lock)
        self._progress_thread: threading.Thread | None = None

    def offer(self) -> bytes:
        """What a sender needs to write into this cache: the agent's metadata (its UCX
        addresses and memory keys), the cache's address, block count and memory kind."""
        with self._lock:
            metadata = self._agent.get_agent_metadata()
        return msgpack.packb({"metadata": metadata, "agent": self.agent_name,
                              "address": self.cache.data_ptr(),
                              "num_blocks": self.cache.shape[2], "device_id": self.device_id,
                              "memory": self.memory, "shape": list(self.cache.shape),
                              "dtype": str(self.cache.dtype)})

    def connect(self, offer_blob: bytes) -> NixlPeer:
        """Adds the offering agent as a peer (once); raises when its cache does not fit."""
        offer = msgpack.unpackb(offer_blob)
        shape, local = tuple(offer["shape"]), self.cache
        if offer["dtype"] != str(local.dtype) or shape[:2] != local.shape[:2] or \
                shape[3:] != local.shape[3:]:
            raise ValueError(f"the peer's KV cache {shape} {offer['dtype']} does not fit this "
                             f"one's {tuple(local.shape)} {local.dtype}")
        with self._lock:
            name = self._agent.add_remote_agent(offer["metadata"])
        name = name.decode() if isinstance(name, bytes) else name
        return NixlPeer(name, offer["address"], offer["num_blocks"], offer["device_id"],
                        offer["memory"])

    def receiving(self) -> _Receiving:
        """`with endpoint.receiving():` around the time a peer may write into this cache: a
        thread makes NIXL progress meanwhile, and stops once no write is expected."""
        return _Receiving(self)

    def _start_receiving(self) -> None:
        with self._lock:
            self._receiving += 1
            if self._progress_thread is None:
                self._progress_thread = threading.Thread(target=self._make_progress,
                                                         name="nixl-progress", daemon=True)
                self._progress_thread.start()

    def _stop_receiving(self) -> None:
        with self._lock:
            self._receiving -= 1

    def _make_progress(self) -> None:
        while True:
            with self._lock:
                if self._receiving == 0:
                    self._progress_thread = None
                    return
                self._agent.get_new_notifs()  # makes progress on every connection
            time.sleep(RECEIVER_POLL_S)

    def forget(self, peer: NixlPeer) -> None:
        with self._lock:
            try:
                self._agent.remove_remote_agent(peer.agent_name)
            except Exception:  # noqa: BLE001 - NIXL raises its own types; the peer is gone
                pass

    def start_write(self, peer: NixlPeer, src_ids: list[int], dst_ids: list[int]):
        """Starts writing blocks src_ids of this cache into blocks dst_ids of the peer's;
        (the transfer's handle, its bytes). `write_state` follows it, `release` ends it."""
        if any(not 0 <= i < peer.num_blocks for i in dst_ids):
            raise ValueError(f"destination blocks outside the peer's {peer.num_blocks}")
        local, remote = self._descriptors(peer, block_runs(src_ids, dst_ids))
        with self._lock:
            local_list = self._agent.get_xfer_descs(local, self.memory)
            remote_list = self._agent.get_xfer_descs(remote, peer.memory)
            handle = self._agent.initialize_xfer("WRITE", local_list, remote_list,
                                                 peer.agent_name)
            try:
                if self._agent.transfer(handle) == "ERR":
                    raise NixlTransferError(f"NIXL write to {peer.agent_name} failed to start")
            except BaseException:
                self._agent.release_xfer_handle(handle)
                raise
        return handle, int(local[:, 1].sum())

    def write_state(self, handle) -> str:
        """DONE, PROC or ERR; polling is what moves the write along (no progress thread)."""
        with self._lock:
            return self._agent.check_xfer_state(handle)

    def release(self, handle) -> None:
        """Frees a transfer's handle; NIXL cancels a write still under way, and raises if it
        cannot (then the source blocks are still being read)."""
        with self._lock:
            self._agent.release_xfer_handle(handle)

    def _descriptors(self, peer: NixlPeer, runs) -> tuple[np.ndarray, np.ndarray]:
        """(address, length, device) rows for both sides: one per layer, keys or values, and
        run of blocks."""
        num_layers, num_blocks = self.cache.shape[0], self.cache.shape[2]
        region = self.cache[0, 0, 0].numel() * self.cache.element_size()  # one block, one plane
        planes = np.arange(num_layers * 2, dtype=np.uint64)[:, None]  # layer * 2 + k/v
        src = np.array([r[0] for r in runs], dtype=np.uint64)[None, :]
        dst = np.array([r[1] for r in runs], dtype=np.uint64)[None, :]
        lengths = np.broadcast_to(np.array([r[2] for r in runs], dtype=np.uint64) * region,
                                  (len(planes), len(runs))).reshape(-1)
        src_addr = self.cache.data_ptr() + (planes * num_blocks + src) * region
        dst_addr = peer.address + (planes * peer.num_blocks + dst) * region
        local = np.stack([src_addr.reshape(-1), lengths,
                          np.full(lengths.shape, self.device_id, dtype=np.uint64)], axis=1)
        remote = np.stack([dst_addr.reshape(-1), lengths,
                           np.full(lengths.shape, peer.device_id, dtype=np.uint64)], axis=1)
        return local, remote

    def close(self) -> None:
        with self._lock:
            try:
                self._agent.deregister_memory(self._registration)
            except Exception:  # noqa: BLE001 - shutting down: nothing to recover
                pass


class _Receiving:
    def __init__(self, endpoint: NixlEndpoint):
        self._endpoint = endpoint

    def __enter__(self) -> None:
        self._endpoint._start_receiving()

    def __exit__(self, *exc) -> None:
        self._endpoint._stop_receiving()
