"""The byte format of exported KV: a header that states the cache layout, then the blocks.

    frame   = u32 little-endian header length | msgpack header | payload
    header  = {"format": "pagewire-kv", "version": 1, "model", "dtype", "block_size",
               "num_layers", "num_kv_heads", "head_dim", "num_tokens", "skip_blocks",
               "num_blocks"}
    payload = num_blocks blocks, each [layers, 2 (k, v), block_size, kv_heads, head_dim] in
              the stated dtype, C order: the blocks after the first skip_blocks of the
              num_tokens tokens (the receiver already holds those).

Block-major order lets a sender stream blocks one by one and skip the ones the receiver holds.
Importing into an engine with any other layout is refused (KVLayoutMismatch): a wrong layout
would decode garbage, never fail loudly. No pickle: msgpack and raw tensor bytes only.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

import msgpack
import torch

FORMAT = "pagewire-kv"
VERSION = 1
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float8_e4m3fn": torch.float8_e4m3fn}


class KVLayoutMismatch(ValueError):
    """The exported KV was made by an engine with another model or cache layout."""


class KVFormatError(ValueError):
    """The bytes are not a complete pagewire KV export."""


@dataclass(frozen=True)
class KVLayout:
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.finfo(KV_DTYPES[self.dtype]).bits // 8

    def check_matches(self, other: KVLayout) -> None:
        diffs = [f"{k}: {v!r} here, {getattr(other, k)!r} in the export"
                 for k, v in asdict(self).items() if getattr(other, k) != v]
        if diffs:
            raise KVLayoutMismatch("KV layout mismatch: " + "; ".join(diffs))


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in KV_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"KV export does not support dtype {dtype}")


def encode_kv(layout: KVLayout, num_tokens: int, blocks: torch.Tensor,
              skip_blocks: int = 0) -> bytes:
    """blocks: [num_blocks, *layout.block_shape] on the CPU, the ones after skip_blocks."""
    if tuple(blocks.shape[1:]) != layout.block_shape:
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not fit {layout}")
    header = msgpack.packb({"format": FORMAT, "version": VERSION, **asdict(layout),
                            "num_tokens": num_tokens, "skip_blocks": skip_blocks,
                            "num_blocks": blocks.shape[0]})
    payload = blocks.contiguous().view(torch.uint8).numpy().tobytes()
    return struct.pack("<I", len(header)) + header + payload


def decode_kv(data: bytes | memoryview) -> tuple[KVLayout, int, int, torch.Tensor]:
    """Returns (layout, num_tokens, skip_blocks, blocks [num_blocks, *block_shape])."""
    view = memoryview(data)
    if len(view) < 4:
        raise KVFormatError("KV export is truncated before its header")
    (header_len,) = struct.unpack_from("<I", view)
    try:
        header = msgpack.unpackb(view[4:4 + header_len])
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise KVFormatError(f"KV export header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise KVFormatError("not a pagewire KV export")
    if header.get("version") != VERSION:
        raise KVFormatError(f"KV export version {header.get('version')} is not {VERSION}")
    try:
        layout = KVLayout(**{k: header[k] for k in KVLayout.__dataclass_fields__})
        num_tokens, num_blocks = int(header["num_tokens"]), int(header["num_blocks"])
        skip_blocks = int(header.get("skip_blocks", 0))
        dtype = KV_DTYPES[layout.dtype]
    except (KeyError, TypeError) as exc:
        raise KVFormatError(f"KV export header is incomplete: {exc}") from exc
    payload = view[4 + header_len:]
    if len(payload) != num_blocks * layout.block_bytes:
        raise KVFormatError(f"KV export holds {len(payload)} payload bytes; its header declares "
                            f"{num_blocks} blocks of {layout.block_bytes}")
    if num_tokens <= 0 or skip_blocks < 0 or \
            skip_blocks + num_blocks != -(-num_tokens // layout.block_size):
        raise KVFormatError(f"{num_tokens} tokens do not fill {skip_blocks} skipped and "
                            f"{num_blocks} sent blocks")
    blocks = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
    return layout, num_tokens, skip_blocks, blocks.view(num_blocks, *layout.block_shape)
