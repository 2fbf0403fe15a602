"""Routing policy: scorers and worker choice, table-driven, no network."""

from __future__ import annotations

import dataclasses

import pytest

from pagewire.cluster.registry import WorkerInfo
from pagewire.cluster.routing import (
    RoutingWeights,
    keeps_decode,
    kv_free_score,
    pick_decode_worker,
    pick_prefill_worker,
    prefix_score,
    queue_score,
)

WEIGHTS = RoutingWeights()


def worker(worker_id, role="both", running=0, waiting=0, free=100, total=100):
    return WorkerInfo(
        worker_id=worker_id, role=role, address=f"{worker_id}:50051", model="m",
        running=running, waiting=waiting, kv_blocks_free=free, kv_blocks_total=total,
    )


@pytest.mark.parametrize(
    "cached, prompt_blocks, expected",
    [(0, 10, 0.0), (5, 10, 0.5), (10, 10, 1.0), (12, 10, 1.0), (3, 0, 0.0), (-1, 4, 0.0)],
)
def test_prefix_score(cached, prompt_blocks, expected):
    assert prefix_score(cached, prompt_blocks) == pytest.approx(expected)


@pytest.mark.parametrize(
    "running, waiting, expected",
    [(0, 0, 1.0), (1, 0, 0.5), (0, 1, 0.5), (2, 1, 0.25), (-3, 0, 1.0)],
)
def test_queue_score_is_one_when_idle_and_falls_with_each_request(running, waiting, expected):
    assert queue_score(running, waiting) == pytest.approx(expected)


def test_one_queued_request_outweighs_a_stale_kv_share():
    """A worker busy with one long request must lose to an idle one even if its heartbeat
    reports more free KV than the idle one's."""
    weights = RoutingWeights()
    busy = WorkerInfo("busy", "decode", "a:1", "m", running=1, kv_blocks_free=90,
                      kv_blocks_total=91)
    idle = WorkerInfo("idle", "decode", "b:1", "m", running=0, kv_blocks_free=52,
                      kv_blocks_total=91)
    assert pick_decode_worker([busy, idle], 4, weights).worker_id == "idle"


@pytest.mark.parametrize(
    "free, total, expected", [(0, 100, 0.0), (25, 100, 0.25), (100, 100, 1.0), (5, 0, 0.0)]
)
def test_kv_free_score(free, total, expected):
    assert kv_free_score(free, total) == pytest.approx(expected)


def test_scorers_stay_in_unit_interval():
    for a in (-5, 0, 1, 7, 64, 1000):
        for b in (-5, 0, 1, 7, 64, 1000):
            assert 0.0 <= prefix_score(a, b) <= 1.0
            assert 0.0 <= queue_score(a, b) <= 1.0
            assert 0.0 <= kv_free_score(a, b) <= 1.0


def test_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="queue"):
        RoutingWeights(queue=-1.0)


PREFILL_CASES = [
    # (name, workers, cached_blocks, prompt_blocks, exclude, expected id)
    ("prefix wins over equal load", [worker("a"), worker("b")], {"b": 8}, 8, set(), "b"),
    ("idle beats loaded without prefix", [worker("a", running=30), worker("b")], {}, 8, set(), "b"),
    ("full prefix beats moderate load", [worker("a"), worker("b", running=20)], {"b": 8}, 8,
     set(), "b"),
    ("deep queue outweighs small prefix", [worker("a"), worker("b", running=64)], {"b": 1}, 8,
     set(), "a"),
    ("decode-only workers never prefill", [worker("a", role="decode"), worker("b", "prefill",
     running=10)], {"a": 8}, 8, set(), "b"),
    ("excluded worker skipped", [worker("a"), worker("b")], {"a": 8}, 8, {"a"}, "b"),
    ("tie breaks by id", [worker("b"), worker("a")], {}, 8, set(), "a"),
    ("more free kv wins when idle", [worker("a", free=10), worker("b", free=90)], {}, 8, set(),
     "b"),
]


@pytest.mark.parametrize(
    "workers, cached, prompt_blocks, exclude, expected",
    [case[1:] for case in PREFILL_CASES], ids=[case[0] for case in PREFILL_CASES],
)
def test_pick_prefill_worker(workers, cached, prompt_blocks, exclude, expected):
    chosen = pick_prefill_worker(workers, cached, prompt_blocks, WEIGHTS, exclude)
    assert chosen is not None and chosen.worker_id == expected


@pytest.mark.parametrize(
    "workers, exclude",
    [([], set()), ([worker("a", role="decode")], set()), ([worker("a")], {"a"})],
)
def test_pick_prefill_worker_none_when_no_candidate(workers, exclude):
    assert pick_prefill_worker(workers, {}, 4, WEIGHTS, exclude) is None


DECODE_CASES = [
    # (name, workers, blocks_needed, exclude, expected id)
    ("most room when idle", [worker("a", free=20), worker("b", free=80)], 10, set(), "b"),
    ("never short when another fits", [worker("a", free=5, running=0),
     worker("b", free=11, running=60)], 10, set(), "b"),
    ("none fits: most free blocks", [worker("a", free=3), worker("b", free=7)], 10, set(), "b"),
    ("prefill-only workers never decode", [worker("a", role="prefill"),
     worker("b", role="decode", running=40)], 1, set(), "b"),
    ("queue matters among fitting", [worker("a", running=40), worker("b", running=2)], 1, set(),
     "b"),
    ("tie breaks by id", [worker("b"), worker("a")], 1, set(), "a"),
    ("excluded worker skipped", [worker("a"), worker("b", running=9)], 1, {"a"}, "b"),
]


@pytest.mark.parametrize(
    "workers, needed, exclude, expected",
    [case[1:] for case in DECODE_CASES], ids=[case[0] for case in DECODE_CASES],
)
def test_pick_decode_worker(workers, needed, exclude, expected):
    chosen = pick_decode_worker(workers, needed, WEIGHTS, exclude)
    assert chosen is not None and chosen.worker_id == expected


def test_pick_decode_worker_none_without_candidates():
    assert pick_decode_worker([worker("a", role="prefill")], 1, WEIGHTS) is None
    assert pick_decode_worker([worker("a")], 1, WEIGHTS, exclude={"a"}) is None


@pytest.mark.parametrize("pick", ["prefill", "decode"])
def test_load_only_routing_spreads_requests(pick):
    """Redis down, no prefix info: as the router counts its in-flight requests, picks rotate."""
    workers = {w.worker_id: w for w in (worker("a"), worker("b"), worker("c"))}
    counts = dict.fromkeys(workers, 0)
    for _ in range(30):
        if pick == "prefill":
            chosen = pick_prefill_worker(list(workers.values()), {}, 8, WEIGHTS)
        else:
            chosen = pick_decode_worker(list(workers.values()), 2, WEIGHTS)
        counts[chosen.worker_id] += 1
        workers[chosen.worker_id] = dataclasses.replace(chosen, running=chosen.running + 1)
    assert counts == {"a": 10, "b": 10, "c": 10}


def test_choice_is_deterministic_regardless_of_input_order():
    workers = [worker("c", running=3), worker("a", running=3), worker("b", running=3)]
    picks = {
        pick_prefill_worker(order, {}, 4, WEIGHTS).worker_id
        for order in (workers, workers[::-1], workers[1:] + workers[:1])
    }
    assert picks == {"a"}


@pytest.mark.parametrize("role, free, needed, expected", [
    ("both", 50, 8, True),  # its KV never moves
    ("both", 4, 8, False),  # no room: decode elsewhere
    ("prefill", 50, 8, False),  # a prefill-only worker never decodes
])
def test_a_worker_that_also_decodes_keeps_what_it_prefilled(role, free, needed, expected):
    assert keeps_decode(worker("a", role=role, free=free), needed) is expected
