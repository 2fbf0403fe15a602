"""Where the router has a prompt computed: table-driven, on measured costs."""

from __future__ import annotations

import pytest

from pagewire.cluster.prefill_placement import CostModel, PlacementConfig

BLOCK_BYTES = 1_000_000  # 1 MB of KV per block


def measured(prefill_speed: float, bandwidth: float,
             config: PlacementConfig | None = None) -> CostModel:
    """A model that saw one prefill on p0 (tokens/s) and one 10-block transfer p0 -> d0."""
    costs = CostModel(config or PlacementConfig())
    costs.observe_prefill("p0", 1000, 1000 / prefill_speed)
    costs.observe_transfer("p0", "d0", "grpc", 10 * BLOCK_BYTES, 10 * BLOCK_BYTES / bandwidth,
                           10)
    return costs


@pytest.mark.parametrize("speed, bandwidth, tokens, blocks, expected", [
    # 64 blocks at 300 MB/s = 213 ms; 1,024 tokens at 10k tok/s = 102 ms: recompute
    (10_000, 300e6, 1024, 64, "local-cheaper"),
    # at 10 GB/s the move is 6.4 ms: ship it
    (10_000, 10e9, 1024, 64, "remote"),
    # a slow decode worker (500 tok/s: 2 s) still takes a slow link
    (500, 300e6, 1024, 64, "remote"),
    # nothing left to compute: always local
    (10_000, 10e9, 0, 0, "local-short"),
])
def test_costs_decide(speed, bandwidth, tokens, blocks, expected):
    assert measured(speed, bandwidth).place("p0", "d0", tokens, blocks) == expected


def test_nothing_measured_means_remote():
    costs = CostModel()
    assert costs.place("p0", "d0", 1024, 64) == "remote"
    costs.observe_prefill("p0", 1000, 0.1)  # a speed but no link yet
    assert costs.place("p0", "d0", 1024, 64) == "remote"
    assert measured(10_000, 300e6).place("p1", "d0", 1024, 64) == "remote"  # another link


def test_a_short_uncached_suffix_stays_local_when_configured():
    config = PlacementConfig(max_local_prefill_tokens=256, cost_based=False)
    costs = measured(10_000, 300e6, config)
    assert costs.place("p0", "d0", 256, 16) == "local-short"
    assert costs.place("p0", "d0", 257, 17) == "remote"  # and costs are not consulted


def test_the_decode_workers_speed_falls_back_to_the_clusters():
    costs = measured(10_000, 300e6)
    assert costs.prefill_speed("d0") == pytest.approx(10_000)
    costs.observe_prefill("d0", 1000, 10.0)  # d0 measured itself: slow
    assert costs.prefill_speed("d0") == pytest.approx(100)
    assert costs.place("p0", "d0", 1024, 64) == "remote"


def test_averages_move_toward_new_measures_and_ignore_empty_ones():
    costs = measured(10_000, 1e9)
    costs.observe_transfer("p0", "d0", "shm", 0, 0.0, 0)  # the decode worker held every block
    assert costs.bandwidth("p0", "d0") == pytest.approx(1e9)
    costs.observe_transfer("p0", "d0", "shm", 10 * BLOCK_BYTES, 10 * BLOCK_BYTES / 2e9, 10)
    assert 1e9 < costs.bandwidth("p0", "d0") < 2e9
    assert costs.link_transport[("p0", "d0")] == "shm"


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError):
        PlacementConfig(max_local_prefill_tokens=-1)
    with pytest.raises(ValueError):
        PlacementConfig(smoothing=0)
