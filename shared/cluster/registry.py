"""The worker registry in Redis: which workers are alive, where they listen, how loaded they are.

Workers call `heartbeat` every ~ttl/3; an entry that is not refreshed within `ttl_s` disappears
(Redis expires it), so there is no static worker list and a crashed worker drops out by itself.
Routers call `workers()` to find live workers of a model and role.

Key layout (all under `{ns}`, the namespace):
    {ns}:worker:{worker_id}   hash, one field per WorkerInfo field (plain strings), PEXPIRE ttl
    {ns}:workers              set of worker ids that heartbeat; an id whose hash has expired is
                              pruned by the next `workers()` call. PEXPIRE ttl, so it goes too
                              when every worker is gone.
Liveness is Redis's own key expiry, so clocks of workers and routers never need to agree.

This module must never pickle (values are plain hash fields) and never decide routing: it only
reports what the workers said about themselves.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
_INT_FIELDS = (
    "running", "waiting", "kv_blocks_free", "kv_blocks_total", "served", "block_size",
    "spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens",
)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports about itself in each heartbeat."""

    worker_id: str
    role: str  # "prefill" | "decode" | "both"
    address: str  # host:port of its gRPC server
    model: str
    running: int = 0  # sequences in the running batch
    waiting: int = 0  # requests queued behind it
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    served: int = 0  # requests completed since start
    block_size: int = 16  # tokens per KV block: the router hashes prompts with it
    device: str = ""  # where its engine runs: "cpu", or "cuda" and the GPU's name
    kv_transports: str = ""  # KV transports it receives on, comma-separated (for /cluster)
    # Speculative decoding since start (vLLM's counters; 0 without it): sequence-steps that
    # verified drafts, draft tokens, accepted tokens, accepted tokens by position ("5,3,1").
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: str = ""

    def __post_init__(self) -> None:
        check_role(self.role)
        for name in ("worker_id", "address", "model"):
            if not getattr(self, name):
                raise ValueError(f"WorkerInfo.{name} must be non-empty")
        for name in _INT_FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"WorkerInfo.{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size < 1:
            raise ValueError(f"WorkerInfo.block_size must be >= 1, got {self.block_size}")

    def serves(self, role: str) -> bool:
        """True when this worker takes `role` work: a "both" worker does prefill and decode."""
        check_role(role)
        return self.role in (role, "both")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown worker role {role!r}; valid roles: {', '.join(ROLES)}")


class WorkerRegistry:
    def __init__(self, redis_client, namespace: str = "pagewire", ttl_s: float = 5.0):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._redis = redis_client
        self._ids_key = f"{namespace}:workers"
        self._worker_prefix = f"{namespace}:worker:"
        self._ttl_ms = max(1, round(ttl_s * 1000))

    def heartbeat(self, info: WorkerInfo) -> None:
        """Upsert `info` and push its expiry ttl_s into the future. One round trip."""
        key = self._worker_prefix + info.worker_id
        fields = {f.name: str(getattr(info, f.name)) for f in dataclasses.fields(info)}
        # MULTI/EXEC: a hash must never exist without its expiry, or the worker would never die.
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, self._ttl_ms)
        pipe.sadd(self._ids_key, info.worker_id)
        pipe.pexpire(self._ids_key, self._ttl_ms)
        pipe.execute()

    def deregister(self, worker_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._worker_prefix + worker_id)
        pipe.srem(self._ids_key, worker_id)
        pipe.execute()

    def workers(self, model: str | None = None, role: str | None = None) -> list[WorkerInfo]:
        """Live workers, sorted by id; `role` "prefill"/"decode" also matches "both" workers."""
        if role is not None:
            check_role(role)
        worker_ids = sorted(_text(m) for m in self._redis.smembers(self._ids_key))
        if not worker_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.hgetall(self._worker_prefix + worker_id)
        live: list[WorkerInfo] = []
        stale: list[str] = []
        for worker_id, fields in zip(worker_ids, pipe.execute()):
            if not fields:
                stale.append(worker_id)
                continue
            info = _decode(worker_id, fields)
            if info is None:
                continue
            if (model is None or info.model == model) and (role is None or info.serves(role)):
                live.append(info)
        if stale:
            # A worker that heartbeats right now may be pruned too; its next heartbeat re-adds it.
            self._redis.srem(self._ids_key, *stale)
        return live


def _decode(worker_id: str, raw_fields: dict) -> WorkerInfo | None:
    fields = {_text(k): _text(v) for k, v in raw_fields.items()}
    try:
        return WorkerInfo(
            worker_id=worker_id,
            role=fields["role"],
            address=fields["address"],
            model=fields["model"],
            **{name: int(fields[name]) for name in _INT_FIELDS if name in fields},
            device=fields.get("device", ""), kv_transports=fields.get("kv_transports", ""),
            spec_accepted_per_position=fields.get("spec_accepted_per_position", ""),
        )
    except (KeyError, ValueError) as exc:
        # Written by a newer or broken worker: skip it rather than fail every routing decision.
        logger.warning("ignoring malformed registry entry for worker %r: %s", worker_id, exc)
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
