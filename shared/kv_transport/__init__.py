"""How a prompt's KV bytes move from a prefill worker to a decode worker.

gRPC stays the control plane for every transport: Decode reserves blocks, PushKV declares the
layout and the blocks and commits them, Abort and deadlines end the transaction
(services/worker/). A transport only moves bytes; it owns no request state, so retries,
timeouts and freeing blocks stay in one place.

Once per (prefill, decode) pair, KVHandshake checks the layouts, and the decode worker offers
every transport it can receive on; the prefill worker takes the first of its own list that it
can open (a probe file it can read, a CUDA IPC handle it can map, a NIXL peer it can add):

    cuda_ipc  one host, GPU: the receiver's KV cache mapped through a CUDA IPC handle; one
              device-to-device copy into the reserved blocks (cuda_ipc.py)
    shm       one host, CPU: the receiver's KV cache lives in a tmpfs file the sender maps;
              one copy into the reserved blocks (shared_memory.py)
    nixl      any two hosts: both caches registered with NIXL (UCX underneath: TCP, RDMA, or
              shared memory where it finds one); the sender writes the reserved blocks region
              by region (nixl_agent.py), each chunk's as it is computed (nixl_stream.py)
    grpc      the bytes inside PushKV messages, imported by the receiver's engine: the fallback
              that works between any two workers

The first three write straight into the blocks the decode worker reserved (its Reserved
message names them), so the receiver copies nothing and its step loop never waits for KV; and
they stream: a prompt's blocks leave as its chunks are computed (block_stream.py), so the
transfer hides under the prefill's compute.
"""

from __future__ import annotations

from collections.abc import Iterable

KV_TRANSPORTS = ("cuda_ipc", "shm", "nixl", "grpc")  # fastest first
FALLBACK = "grpc"
DIRECT_TRANSPORTS = frozenset({"cuda_ipc", "shm", "nixl"})  # write into the reserved blocks


def check_transports(names: Iterable[str]) -> tuple[str, ...]:
    """Validated transport names, in the given order, the fallback always last."""
    names = tuple(names)
    unknown = [n for n in names if n not in KV_TRANSPORTS]
    if unknown:
        raise ValueError(f"unknown KV transports {unknown}; choose from {list(KV_TRANSPORTS)}")
    return tuple(n for n in dict.fromkeys(names) if n != FALLBACK) + (FALLBACK,)


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, length) for each run of blocks that are
    consecutive on both sides: one copy (or one NIXL region per layer) per run, not per block.
    Fresh allocations are mostly consecutive, so a 64-block prompt is often one run."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            first_src, first_dst, length = runs[-1]
            runs[-1] = (first_src, first_dst, length + 1)
        else:
            runs.append((src, dst, 1))
    return runs
