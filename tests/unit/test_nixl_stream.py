"""The NIXL streamer between two real agents (UCX on loopback, CPU memory): a prompt's blocks
land in the peer's reserved blocks chunk by chunk, before the prompt is done; `before_free`
returns only once nothing reads the blocks; a failed write is reported, never raised into the
engine's step."""

from __future__ import annotations

import time

import pytest
import torch

from pagewire.kv_transport.nixl_agent import NixlEndpoint, nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")


@pytest.fixture(scope="module")
def pair():
    from pagewire.kv_transport.nixl_stream import NixlStreamer  # noqa: F401 - needs nixl

    sender = NixlEndpoint("stream-sender", torch.randn(3, 2, 10, 4, 2, 8))
    receiver = NixlEndpoint("stream-receiver", torch.zeros(3, 2, 6, 4, 2, 8))
    peer = sender.connect(receiver.offer())
    yield sender, receiver, peer
    sender.close()
    receiver.close()


def landed(receiver, dst: list[int], sender, src: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if torch.equal(receiver.cache[:, :, dst], sender.cache[:, :, src]):
            return True
        time.sleep(0.01)
    return False


def test_blocks_land_chunk_by_chunk_before_the_prompt_is_done(pair):
    from pagewire.kv_transport.nixl_stream import NixlStreamer

    sender, receiver, peer = pair
    receiver.cache.zero_()
    table, dst = [2, 3, 4, 9], [5, 0, 1, 3]  # a 14-token prompt of 4-token blocks
    streamer = NixlStreamer(sender, peer, dst[1:], skip_blocks=1, timeout_s=30)
    with receiver.receiving():
        streamer.on_computed(sender.cache, table, 6, 14)  # inside block 1: nothing to send
        assert streamer.num_sent == 0
        streamer.on_computed(sender.cache, table, 12, 14)  # blocks 1 and 2 are full
        # they travel while the prompt's last chunk is still to come
        assert landed(receiver, [0, 1], sender, [3, 4])
        assert torch.count_nonzero(receiver.cache[:, :, 3]) == 0
        streamer.on_computed(sender.cache, table, 14, 14)  # the last chunk: the partial block
        streamer.before_free()  # returns once nothing is queued or in flight
        assert torch.equal(receiver.cache[:, :, 3], sender.cache[:, :, 9])
        streamer.stop()
        streamer.wait()
    assert streamer.complete and streamer.error is None
    assert streamer.num_bytes == 3 * sender.cache[:, :, 0].numel() * 4
    assert streamer.seconds > 0
    assert torch.count_nonzero(receiver.cache[:, :, [2, 4, 5]]) == 0  # nothing else written


def test_a_failed_write_is_reported_not_raised(pair):
    from pagewire.kv_transport.nixl_stream import NixlStreamer

    sender, _, _ = pair
    gone = NixlEndpoint("stream-gone", torch.zeros(3, 2, 6, 4, 2, 8))
    peer = sender.connect(gone.offer())
    sender.forget(peer)  # the peer left: a write to it cannot start
    gone.close()
    streamer = NixlStreamer(sender, peer, [0, 1], skip_blocks=0, timeout_s=30)
    streamer.on_computed(sender.cache, [4, 5], 8, 8)  # in the engine's step: must not raise
    streamer.before_free()
    streamer.stop()
    streamer.wait()
    assert streamer.error is not None and not streamer.complete
    assert streamer.num_bytes == 0
    with pytest.raises(ValueError, match="outside the peer's 6"):
        NixlStreamer(sender, peer, [6], skip_blocks=0, timeout_s=30)


def test_a_streamer_that_sent_nothing_waits_for_nothing(pair):
    from pagewire.kv_transport.nixl_stream import NixlStreamer

    sender, _, peer = pair
    streamer = NixlStreamer(sender, peer, [0], skip_blocks=0, timeout_s=30)
    streamer.before_free()
    streamer.stop()
    streamer.wait()
    assert streamer.num_sent == 0 and not streamer.complete and streamer.error is None
