"""A request's state inside the engine, counted in tokens, not in phases.

`num_computed_tokens` tokens of the sequence have KV in `block_table`. A prefill chunk, a prefix
hit, an imported KV prefix and a decode step all just advance it; when it reaches num_tokens the
sequence samples its next token.

With async scheduling a sampled token is known to the device before the host reads it back:
`num_pending_tokens` (0, 1 or 2) such tokens follow `token_ids` and count in `num_tokens`, so the
scheduler can plan the next step before the host has them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from pagewire.engine.prefix_hash import extend_block_hashes
from pagewire.sampling.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass(eq=False)  # identity semantics: queues find and remove sequences by identity
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_size: int
    arrival_time: float = 0.0
    prompt_text: str | None = None
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (or imported)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    eos_token_ids: frozenset[int] = frozenset()  # empty when params.ignore_eos
    hold_kv: bool = False  # keep blocks after finishing, for KV export (prefill role)
    # Set while the sequence only holds blocks awaiting imported KV (reserve_kv): the number
    # of leading blocks that came from this engine's prefix cache.
    reserved_blocks: int | None = None
    # Logprobs of each output token: (sampled logprob, {token_id: logprob} of the top-n).
    output_logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    num_preemptions: int = 0
    micro_batch: int = 0  # which of the scheduler's pipeline micro-batches it runs in
    num_pending_tokens: int = 0  # sampled on the device, not yet appended (async scheduling)
    max_num_tokens: int | None = None  # prompt + max_tokens within the context (engine sets it)
    # Where its prompt's KV goes as it is computed (a prefill worker's transfer): the engine
    # calls kv_sink.on_computed(kv_cache, block_table, num_computed, num_prompt_tokens) after
    # every step that advanced it, and kv_sink.before_free() before its blocks are freed
    # (pagewire.kv_transport.block_stream).
    kv_sink: object | None = None
    # Its place in its structured-output grammar (pagewire.structured_output), when it has one
    grammar: object | None = None
    # Speculative decoding: draft tokens to verify in the next step (they follow token_ids and
    # are scheduled with it, never part of it), and this request's acceptance so far.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: torch.Tensor | None = None  # [drafts, V] the draft model's q, if random
    spec_draft_computed: int = 0  # tokens whose KV the draft model's cache holds
    spec_num_drafted: int = 0
    spec_num_accepted: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self._update_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens the host has (pending ones not counted)."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def reached_max_tokens(self) -> bool:
        """Its pending tokens end it by length: scheduling it again would be wasted work."""
        return self.max_num_tokens is not None and self.num_tokens >= self.max_num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Adds a sampled token (the oldest pending one, if any)."""
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1
        self.token_ids.append(token_id)
        self._update_hashes()

    def _update_hashes(self) -> None:
        extend_block_hashes(self.block_hashes, self.token_ids, self.block_size)
