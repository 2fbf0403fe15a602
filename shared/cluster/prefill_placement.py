"""Where a disaggregated request's prompt is computed: on a prefill worker, whose KV then moves
to the decode worker ("remote"), or on the decode worker itself ("local").

Moving KV is not free, and for a short uncached suffix, or a slow link, recomputing it on the
decode worker costs less than shipping it (small models over TCP are the known case). So the
router decides per request, from what it measured:

    local-short    the decode worker lacks at most `max_local_prefill_tokens` of the prompt
    local-cheaper  moving the KV it lacks over the pair's measured bandwidth would take longer
                   than the decode worker takes to compute those tokens (its measured prefill
                   speed, or the cluster's when it has none yet)
    remote         otherwise, and whenever a cost is not known yet

The decode worker's own cached prefix counts on both sides: it neither recomputes nor receives
those blocks. Recomputing on the decode worker stalls the streams it is decoding for as long as
the prefill takes, which is what disaggregation exists to avoid, so the threshold is off (0) by
default and the cost rule compares only like with like.

Pure: no I/O and no clocks. `CostModel` keeps exponentially weighted averages of what the
router observes (each prefill's duration and tokens, each transfer's bytes and duration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECISIONS = ("remote", "local-short", "local-cheaper")


@dataclass(frozen=True)
class PlacementConfig:
    max_local_prefill_tokens: int = 0
    """A prompt whose part not cached on the decode worker is at most this long is computed
    there, never moved (Dynamo's max_local_prefill_length). 0: only costs decide."""
    cost_based: bool = True
    """Also compute locally when the measured transfer would cost more than recomputing."""
    smoothing: float = 0.2
    """Weight of each new observation in the running averages."""

    def __post_init__(self) -> None:
        if self.max_local_prefill_tokens < 0:
            raise ValueError("max_local_prefill_tokens must be >= 0")
        if not 0 < self.smoothing <= 1:
            raise ValueError("smoothing must be in (0, 1]")


@dataclass
class Average:
    value: float = 0.0
    count: int = 0

    def add(self, sample: float, weight: float) -> None:
        self.value = sample if self.count == 0 else (1 - weight) * self.value + weight * sample
        self.count += 1


@dataclass
class CostModel:
    """What the router has measured: per-worker prefill speed, per-pair transfer bandwidth,
    and the KV bytes per block (one model's layout; the same for every pair)."""

    config: PlacementConfig = PlacementConfig()
    prefill_tokens_per_s: dict[str, Average] = field(default_factory=dict)
    link_bytes_per_s: dict[tuple[str, str], Average] = field(default_factory=dict)
    link_transport: dict[tuple[str, str], str] = field(default_factory=dict)
    kv_bytes_per_block: Average = field(default_factory=Average)

    def observe_prefill(self, worker_id: str, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s.setdefault(worker_id, Average()).add(
                tokens / seconds, self.config.smoothing)

    def observe_transfer(self, prefill_id: str, decode_id: str, transport: str,
                         kv_bytes: int, seconds: float, num_blocks: int) -> None:
        if kv_bytes <= 0 or seconds <= 0 or num_blocks <= 0:
            return  # nothing moved (the decode worker held every block): nothing learnt
        link = (prefill_id, decode_id)
        self.link_bytes_per_s.setdefault(link, Average()).add(kv_bytes / seconds,
                                                               self.config.smoothing)
        self.link_transport[link] = transport
        self.kv_bytes_per_block.add(kv_bytes / num_blocks, self.config.smoothing)

    def prefill_speed(self, worker_id: str) -> float | None:
        """Tokens/s the worker prefills at, or the cluster's mean while it has no measure."""
        if worker_id in self.prefill_tokens_per_s:
            return self.prefill_tokens_per_s[worker_id].value
        known = [a.value for a in self.prefill_tokens_per_s.values()]
        return sum(known) / len(known) if known else None

    def bandwidth(self, prefill_id: str, decode_id: str) -> float | None:
        link = self.link_bytes_per_s.get((prefill_id, decode_id))
        return link.value if link else None

    def place(self, prefill_id: str, decode_id: str, num_uncached_tokens: int,
              num_uncached_blocks: int) -> str:
        """One of DECISIONS for a prompt the decode worker lacks `num_uncached_tokens` of
        (`num_uncached_blocks` blocks to move)."""
        if num_uncached_tokens <= self.config.max_local_prefill_tokens:
            return "local-short"
        if not self.config.cost_based or self.kv_bytes_per_block.count == 0:
            return "remote"
        bandwidth, speed = self.bandwidth(prefill_id, decode_id), self.prefill_speed(decode_id)
        if bandwidth is None or speed is None:
            return "remote"
        transfer_s = num_uncached_blocks * self.kv_bytes_per_block.value / bandwidth
        recompute_s = num_uncached_tokens / speed
        return "local-cheaper" if transfer_s > recompute_s else "remote"
