"""Routing policy: which prefill and which decode worker a request goes to.

A worker's score is a weighted sum of small scorers, each a pure function returning a value in
[0, 1] (prefix overlap, queue depth, free KV blocks); the weights live in `RoutingWeights`.
Ties break by load, then worker id, so the choice is deterministic.

Load comes from registry heartbeats, which lag. A router must fold the requests it has in
flight on a worker into that worker's `running` (dataclasses.replace) before calling these
functions, or a burst between heartbeats would all land on one worker.
With Redis down, the router passes cached_blocks={} and routing is by load alone.

This module must never do I/O: no Redis, no gRPC, no clocks. Plain data in, a choice out.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagewire.cluster.registry import WorkerInfo

ROUTING_POLICIES = ("prefix", "round-robin")  # how a router picks prefill workers


@dataclass(frozen=True)
class RoutingWeights:
    prefix: float = 1.0  # weight of the share of the prompt's blocks already cached
    queue: float = 0.5  # weight of idleness (running + waiting requests)
    # Weight of the share of KV blocks free. Small: room is a constraint (a decode worker must
    # fit the prompt) more than a preference, and it comes from heartbeats that lag.
    kv_free: float = 0.1

    def __post_init__(self) -> None:
        for name in ("prefix", "queue", "kv_free"):
            if getattr(self, name) < 0:
                raise ValueError(f"RoutingWeights.{name} must be >= 0, got {getattr(self, name)}")


def prefix_score(num_cached_blocks: int, num_prompt_blocks: int) -> float:
    """Share of the prompt's full blocks the worker already holds; 0 for a prompt without any."""
    if num_prompt_blocks <= 0:
        return 0.0
    return min(max(num_cached_blocks, 0), num_prompt_blocks) / num_prompt_blocks


def queue_score(running: int, waiting: int) -> float:
    """1 for an idle worker, 1/2 with one request, 1/3 with two...: every request counts, and
    the first ones count most (a worker's step time grows with its batch, a queue's wait more)."""
    return 1.0 / (1 + max(running, 0) + max(waiting, 0))


def kv_free_score(free: int, total: int) -> float:
    """Share of the worker's KV blocks that are free; 0 when it reports no cache."""
    if total <= 0:
        return 0.0
    return min(max(free, 0), total) / total


def pick_prefill_worker(
    workers: list[WorkerInfo],
    cached_blocks: dict[str, int],
    num_prompt_blocks: int,
    weights: RoutingWeights,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> WorkerInfo | None:
    """Best prefill-capable worker for a prompt of `num_prompt_blocks` full blocks, or None."""
    candidates = [w for w in workers if w.serves("prefill") and w.worker_id not in exclude]

    def score(w: WorkerInfo) -> float:
        cached = cached_blocks.get(w.worker_id, 0)
        return weights.prefix * prefix_score(cached, num_prompt_blocks) + _load_score(w, weights)

    return min(candidates, key=lambda w: (-score(w), _load(w), w.worker_id), default=None)


def pick_decode_worker(
    workers: list[WorkerInfo],
    num_blocks_needed: int,
    weights: RoutingWeights,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> WorkerInfo | None:
    """Best decode-capable worker with `num_blocks_needed` free KV blocks, or None.

    A worker short of blocks is chosen only when no candidate has enough, and then the one
    with the most free blocks (it frees blocks as its sequences end).
    """
    candidates = [w for w in workers if w.serves("decode") and w.worker_id not in exclude]
    fitting = [w for w in candidates if w.kv_blocks_free >= num_blocks_needed]
    if not fitting:
        most_room = lambda w: (-w.kv_blocks_free, _load(w), w.worker_id)
        return min(candidates, key=most_room, default=None)
    return min(
        fitting,
        key=lambda w: (-_load_score(w, weights), _load(w), -w.kv_blocks_free, w.worker_id),
    )


def keeps_decode(prefill: WorkerInfo, num_blocks_needed: int) -> bool:
    """Whether the worker chosen to prefill also decodes the request: a worker in role `both`
    with room for it does (its KV never moves; picking a decode worker apart from it would ship
    the prompt's KV to a peer that could have computed it). Prefill-only workers never do."""
    return prefill.serves("decode") and prefill.kv_blocks_free >= num_blocks_needed


def _load_score(w: WorkerInfo, weights: RoutingWeights) -> float:
    return weights.queue * queue_score(w.running, w.waiting) + weights.kv_free * kv_free_score(
        w.kv_blocks_free, w.kv_blocks_total
    )


def _load(w: WorkerInfo) -> int:
    return w.running + w.waiting
