"""The shared-memory KV transport's folder: a receiver's cache file that a sender maps and
writes through, a probe that proves two processes see one folder, and the sweep of files left
by dead processes. Also the pure helpers every direct transport uses."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from pagewire.kv_transport import block_runs, check_transports
from pagewire.kv_transport.mapped_cache import BlockStreamer, check_peer_cache
from pagewire.kv_transport.shared_memory import SharedFileError, SharedMemoryFolder


def test_a_peer_writes_through_its_mapping_of_the_owners_cache(tmp_path):
    owner, peer = SharedMemoryFolder(tmp_path), SharedMemoryFolder(tmp_path)
    name, owned = owner.create_cache(4 * 2 * 8 * 16)
    assert torch.count_nonzero(owned) == 0  # zeroed, like torch.zeros
    cache = owned.view(torch.float32).view(4, 2, 8, 2, 2)
    mapped = peer.open_cache(name, owned.numel()).view(torch.float32).view(4, 2, 8, 2, 2)
    mapped[:, :, 3] = 7.0
    assert torch.all(cache[:, :, 3] == 7.0) and torch.count_nonzero(cache[:, :, 2]) == 0
    owner.close()
    assert list(tmp_path.iterdir()) == []


def test_cache_files_are_checked_by_name_and_size(tmp_path):
    folder = SharedMemoryFolder(tmp_path)
    name, _ = folder.create_cache(64)
    with pytest.raises(SharedFileError, match="holds 64 bytes"):
        folder.open_cache(name, 128)
    for bad in ("../etc/passwd", "pagewire-kvcache-1-xyz", "other"):
        with pytest.raises(SharedFileError, match="not a KV cache file name"):
            folder.open_cache(bad, 64)
    with pytest.raises(SharedFileError, match="is not in"):
        folder.open_cache("pagewire-kvcache-1-" + "0" * 32, 64)


def test_a_full_folder_refuses_a_cache_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError):
        SharedMemoryFolder(tmp_path).create_cache(1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_a_probe_proves_one_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    receiver, same, other = (SharedMemoryFolder(tmp_path / d) for d in ("a", "a", "b"))
    assert receiver.open()
    assert same.holds_probe(receiver.probe_name, receiver.probe_token)
    assert not same.holds_probe(receiver.probe_name, b"another token")
    assert not other.holds_probe(receiver.probe_name, receiver.probe_token)
    receiver.close()
    assert not same.holds_probe(receiver.probe_name, receiver.probe_token)
    assert not SharedMemoryFolder(tmp_path / "missing").open()


def test_only_old_files_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    old = time.time() - 120
    names = {"dead-old": f"pagewire-kvcache-{dead}-" + "a" * 32,
             "dead-new": f"pagewire-kvcache-{dead}-" + "b" * 32,
             "alive-old": f"pagewire-kvcache-{os.getpid()}-" + "c" * 32,
             "dead-probe": f"pagewire-probe-{dead}-" + "d" * 32,
             "not ours": "pagewire-notes.txt"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key != "dead-new":
            os.utime(tmp_path / name, (old, old))
    assert SharedMemoryFolder(tmp_path).remove_stale() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["dead-new"], names["alive-old"], names["not ours"]])


def test_transport_names_keep_grpc_last_and_the_given_order():
    assert check_transports(["grpc", "shm"]) == ("shm", "grpc")
    assert check_transports(["nixl", "shm"]) == ("nixl", "shm", "grpc")
    with pytest.raises(ValueError, match="unknown KV transports"):
        check_transports(["rdma"])


@pytest.mark.parametrize("src, dst, runs", [
    ([], [], []),
    ([4, 5, 6], [10, 11, 12], [(4, 10, 3)]),
    ([4, 5, 6], [10, 12, 13], [(4, 10, 1), (5, 12, 2)]),
    ([4, 6, 7], [10, 11, 12], [(4, 10, 1), (6, 11, 2)]),
    ([7, 6], [1, 0], [(7, 1, 1), (6, 0, 1)]),
])
def test_block_runs_merge_blocks_consecutive_on_both_sides(src, dst, runs):
    assert block_runs(src, dst) == runs


def test_the_streamer_sends_each_block_once_as_chunks_complete():
    cache = torch.randn(3, 2, 10, 4, 2, 8)  # 4-token blocks
    peer = torch.zeros(3, 2, 6, 4, 2, 8)
    table, dst = [2, 3, 4, 9], [5, 0, 1, 3]  # a 14-token prompt: 3 full blocks and a partial one
    streamer = BlockStreamer(peer, dst[1:], skip_blocks=1)  # the peer holds block 0 already
    streamer.on_computed(cache, table, 6, 14)  # a chunk ends inside block 1: nothing to send
    assert streamer.num_sent == 0
    streamer.on_computed(cache, table, 12, 14)  # blocks 1 and 2 are full
    assert streamer.num_sent == 2 and torch.equal(peer[:, :, [0, 1]], cache[:, :, [3, 4]])
    peer[:, :, [0, 1]] = 0  # not sent again:
    streamer.on_computed(cache, table, 14, 14)  # the last chunk: the partial block too
    streamer.wait()
    assert streamer.complete and torch.count_nonzero(peer[:, :, [0, 1, 2, 4, 5]]) == 0
    assert torch.equal(peer[:, :, 3], cache[:, :, 9])
    assert streamer.num_bytes == 3 * cache[:, :, 0].numel() * 4 and streamer.error is None


def test_a_stopped_or_failed_streamer_sends_nothing_more_and_never_raises():
    cache, peer = torch.randn(3, 2, 10, 4, 2, 8), torch.zeros(3, 2, 6, 4, 2, 8)
    stopped = BlockStreamer(peer, [0, 1], skip_blocks=0)
    stopped.stop()
    stopped.on_computed(cache, [4, 5], 8, 8)
    assert stopped.num_sent == 0 and torch.count_nonzero(peer) == 0
    broken = BlockStreamer(peer, [0, 1], skip_blocks=0)
    broken.on_computed(cache[:, :, :, :, :, :4], [4, 5], 8, 8)  # another layout: the copy fails
    assert isinstance(broken.error, RuntimeError) and broken.num_sent == 0
    with pytest.raises(ValueError, match="outside the peer's 6"):
        BlockStreamer(peer, [6], skip_blocks=0)
    with pytest.raises(ValueError, match="does not fit"):
        check_peer_cache(cache, torch.zeros(3, 2, 6, 4, 2, 4))
