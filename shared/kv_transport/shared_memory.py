"""The shared-memory KV transport: one host, CPU memory, one copy.

A decode worker on the CPU keeps its whole KV cache in a file of a tmpfs folder (`/dev/shm`),
mapped shared. A prefill worker on the same host maps that file too and copies a request's
blocks straight into the blocks the decode worker reserved for it: one copy, out of one cache
into the other, and nothing for the receiver to do but commit.

Whether two workers share the folder is proven, not guessed: the receiver writes a probe file
with a random token, and the sender must read the same token back (KVHandshake). Containers
with private `/dev/shm` folders, or two hosts, fail the probe and use another transport.

Space is taken with posix_fallocate before anything is mapped: writing a sparse tmpfs file
past the folder's limit (Docker's default /dev/shm is 64 MB) kills a process with SIGBUS,
fallocate refuses it with ENOSPC, and the worker keeps its cache in private memory instead.
A worker removes its files when it stops; one killed leaves them, and `remove_stale` deletes
them at the next start of any worker on the folder.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_PREFIX, PROBE_PREFIX = "pagewire-kvcache-", "pagewire-probe-"
_NAME = re.compile(r"pagewire-(kvcache|probe)-(\d+)-([0-9a-f]{32})")
STALE_AFTER_S = 60.0  # files of a process that is gone, this old, are left over from a crash
# Page tables filled at mapping time: else every 4 KiB page faults on its first write, which
# measured half the time of a prompt's first transfer into fresh blocks.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class SharedFileError(ValueError):
    """A file named by a peer is missing, foreign or of the wrong size."""


class SharedMemoryFolder:
    """A tmpfs folder where this process keeps a shared KV cache, or maps a peer's."""

    def __init__(self, path: str | os.PathLike = "/dev/shm"):
        self.path = Path(path)
        self.probe_name, self.probe_token = "", b""
        self._owned: list[str] = []

    def open(self) -> bool:
        """Writes this process's probe; False when the folder is missing or read-only."""
        try:
            self.remove_stale()
            name = self._new_name(PROBE_PREFIX)
            token = secrets.token_bytes(16)
            with open(self.path / name, "xb") as probe:
                probe.write(token)
        except OSError as exc:
            logger.info("no shared-memory KV transport (%s: %s)", self.path, exc)
            return False
        self.probe_name, self.probe_token = name, token
        self._owned.append(name)
        return True

    def close(self) -> None:
        """Removes this process's files (mappings of them stay valid until dropped)."""
        for name in self._owned:
            (self.path / name).unlink(missing_ok=True)
        self._owned.clear()
        self.probe_name = ""

    def holds_probe(self, name: str, token: bytes) -> bool:
        """True when another process's probe `name` is here and holds `token`."""
        if not token or not self._valid(name, PROBE_PREFIX):
            return False
        try:
            return (self.path / name).read_bytes() == token
        except OSError:
            return False

    def create_cache(self, num_bytes: int) -> tuple[str, torch.Tensor]:
        """A new zeroed file of `num_bytes`: (its name, a uint8 tensor over a shared mapping
        of it, which lives as long as the tensor or views of it). OSError (ENOSPC: the folder
        is full) leaves nothing behind."""
        if num_bytes <= 0:
            raise ValueError(f"a KV cache of {num_bytes} bytes")
        name = self._new_name(CACHE_PREFIX)
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, num_bytes)
            mapped = mmap.mmap(fd, num_bytes, flags=MAP_FLAGS)
        except BaseException:
            (self.path / name).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._owned.append(name)
        return name, torch.frombuffer(mapped, dtype=torch.uint8)

    def open_cache(self, name: str, num_bytes: int) -> torch.Tensor:
        """A peer's cache file as a uint8 tensor over a shared, writable mapping."""
        if not self._valid(name, CACHE_PREFIX):
            raise SharedFileError(f"{name!r} is not a KV cache file name")
        try:
            fd = os.open(self.path / name, os.O_RDWR)
        except FileNotFoundError:
            raise SharedFileError(f"KV cache file {name!r} is not in {self.path}") from None
        try:
            size = os.fstat(fd).st_size
            if size != num_bytes:
                raise SharedFileError(f"KV cache file {name!r} holds {size} bytes; its owner "
                                      f"declares {num_bytes}")
            mapped = mmap.mmap(fd, num_bytes, flags=MAP_FLAGS)
        finally:
            os.close(fd)
        return torch.frombuffer(mapped, dtype=torch.uint8)

    def remove(self, name: str) -> None:
        """Removes one of this folder's pagewire files by name (a cache whose owner stops)."""
        if _NAME.fullmatch(name):
            (self.path / name).unlink(missing_ok=True)

    def remove_stale(self) -> int:
        """Deletes files whose process is gone and that are a minute old."""
        removed = 0
        for entry in self.path.glob("pagewire-*"):
            match = _NAME.fullmatch(entry.name)
            if match is None or _alive(int(match.group(2))):
                continue
            try:
                if time.time() - entry.stat().st_mtime > STALE_AFTER_S:
                    entry.unlink()
                    removed += 1
            except OSError:
                continue  # another worker removed it first
        return removed

    @staticmethod
    def _new_name(prefix: str) -> str:
        return f"{prefix}{os.getpid()}-{secrets.token_hex(16)}"

    @staticmethod
    def _valid(name: str, prefix: str) -> bool:
        return name.startswith(prefix) and _NAME.fullmatch(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
