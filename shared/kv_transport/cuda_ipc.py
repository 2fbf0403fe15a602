"""The CUDA IPC KV transport: one host, GPU memory, one device-to-device copy.

A decode worker on a GPU exports its KV cache's allocation as a CUDA IPC handle at the
handshake; a prefill worker on the same host maps it into its own device's address space
(peer access when the two workers have different GPUs) and copies a request's blocks straight
into the reserved ones (mapped_cache.py): no host round trip, nothing for the receiver to do.
Two processes on one GPU work too.

The handle travels as msgpack (never pickle): torch's own export of a CUDA storage
(`_share_cuda_`, what torch.multiprocessing sends), plus the cache's shape and dtype. A handle
that cannot be opened (another host, a container without the host's IPC namespace, devices
without peer access) fails the handshake's offer and the pair takes the next transport.
A receiver that restarts has a new cache id; the sender then drops its mapping and shakes
hands again (services/worker/kv_push.py), so it never writes through a stale handle.
"""

from __future__ import annotations

import msgpack
import torch

from pagewire.engine.kv_transfer import KV_DTYPES, dtype_name


def export_handle(cache: torch.Tensor) -> bytes:
    """The cache's allocation as bytes another process on this host can open."""
    if not cache.is_cuda or not cache.is_contiguous():
        raise ValueError("only a contiguous CUDA tensor can be shared by CUDA IPC")
    (device, handle, storage_bytes, storage_offset_bytes, ref_counter_handle,
     ref_counter_offset, event_handle, event_sync_required) = \
        cache.untyped_storage()._share_cuda_()
    return msgpack.packb({
        "device": device, "handle": handle, "storage_bytes": storage_bytes,
        "storage_offset_bytes": storage_offset_bytes, "ref_counter_handle": ref_counter_handle,
        "ref_counter_offset": ref_counter_offset, "event_handle": event_handle,
        "event_sync_required": event_sync_required, "shape": list(cache.shape),
        "dtype": dtype_name(cache.dtype), "offset": cache.storage_offset()})


def open_handle(blob: bytes, device: torch.device) -> torch.Tensor:
    """The peer's cache, mapped into `device`'s address space. Raises on any failure (a handle
    from another host or namespace), which the handshake treats as 'not this transport'."""
    fields = msgpack.unpackb(blob)
    dtype = KV_DTYPES[fields["dtype"]]
    torch.cuda._lazy_init()
    with torch.cuda.device(device):
        storage = torch.UntypedStorage._new_shared_cuda(
            device.index if device.index is not None else torch.cuda.current_device(),
            fields["handle"], fields["storage_bytes"], fields["storage_offset_bytes"],
            fields["ref_counter_handle"], fields["ref_counter_offset"], fields["event_handle"],
            fields["event_sync_required"])
    shape = tuple(fields["shape"])
    numel = 1
    for dim in shape:
        numel *= dim
    if (fields["offset"] + numel) * dtype.itemsize > storage.nbytes():
        raise ValueError("a CUDA IPC handle smaller than the cache it describes")
    flat = torch.empty(0, dtype=dtype, device=storage.device)
    flat.set_(storage, fields["offset"], (numel,))
    return flat.view(shape)
