"""Continuous batching: which sequences run in the next step, and how many tokens each.

Speaks only in tokens (vLLM v1's idea): every sequence wants `num_tokens - num_computed_tokens`
more tokens computed, whether that is a prompt chunk, a recompute after preemption or one decode
token, plus its speculative drafts if it has any (computed with it, then verified). Running
sequences go first (FCFS), then waiting ones while the token budget, the sequence limit and the
free blocks allow. When blocks run out, the newest running sequence is
preempted by recompute: its blocks are freed and it waits again at the front of the queue
(its prefix may still hit the cache when it returns). Returns plain data; never touches tensors.

Pipeline micro-batches (`num_micro_batches` > 1): each sequence belongs to one micro-batch (the
one scheduling when it was admitted) and steps take the micro-batches in turn, so a step never
holds a sequence whose previous token is still in the pipeline, and each stage works on
another step at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagewire.engine.block_manager import BlockManager
from pagewire.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_prefix_hit_tokens: int = 0  # tokens newly admitted sequences found in the prefix cache
    micro_batch: int = 0  # whose turn it was

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, num_micro_batches: int = 1):
        self.block_manager = block_manager
        self.num_micro_batches = num_micro_batches
        self._turn = 0  # the micro-batch the next step schedules
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def next_turn(self) -> int:
        """The micro-batch the next schedule() takes."""
        return self._turn % self.num_micro_batches

    def schedule(self) -> ScheduledBatch:
        turn = self.next_turn
        batch = ScheduledBatch(micro_batch=turn)
        self._turn = turn + 1
        budget = self._schedule_running(batch, self.max_num_batched_tokens, turn)
        if not batch.preempted:  # no room was short this step: admit new work
            self._schedule_waiting(batch, budget, turn)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int, turn: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # its last token is in flight: nothing left to compute; or another micro-batch's
            if seq.reached_max_tokens or (self.num_micro_batches > 1 and
                                          seq.micro_batch != turn):
                i += 1
                continue
            spec = seq.spec_token_ids
            num_new = min(seq.num_tokens + len(spec) - seq.num_computed_tokens, budget)
            if spec and num_new < 1 + len(spec):  # the budget cuts the drafts short
                del spec[max(num_new - 1, 0):]
            while not self.block_manager.allocate(seq.block_table,
                                                  seq.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    return budget
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, turn: int) -> None:
        if not self.waiting:
            return
        # A sequence whose last token is in flight (async scheduling) leaves its seat now.
        num_active = sum(not seq.reached_max_tokens for seq in self.running)
        # Micro-batches stay even: this one admits up to its share of all the work (counted
        # only where there are several: the loop runs at every step).
        share = in_turn = 0
        if self.num_micro_batches > 1:
            share = -(-(len(self.running) + len(self.waiting)) // self.num_micro_batches)
            in_turn = sum(seq.micro_batch == turn for seq in self.running)
        while self.waiting and budget > 0 and num_active < self.max_num_seqs and \
                (self.num_micro_batches == 1 or in_turn < share):
            seq = self.waiting[0]
            cached_blocks: list[int] = []
            if not seq.block_table:
                # Full blocks only, and never the whole sequence: its last token must be
                # computed to produce the logits for the next one.
                max_hit_blocks = (seq.num_tokens - 1) // self.block_size
                cached_blocks = self.block_manager.cached_prefix_blocks(
                    seq.block_hashes[:max_hit_blocks])
            num_cached = len(cached_blocks) * self.block_size
            num_computed = seq.num_computed_tokens + num_cached
            num_new = min(seq.num_tokens - num_computed, budget)
            if not self.block_manager.allocate(seq.block_table, num_computed + num_new,
                                               cached_blocks):
                break
            if seq.num_preemptions == 0 and num_cached:
                seq.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_computed
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.micro_batch = turn
            self.running.append(seq)
            num_active += 1
            in_turn += 1
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            batch.num_prefix_hit_tokens += num_cached
            budget -= num_new

    def free_blocks(self, seq: Sequence) -> None:
        """Gives a sequence's blocks back; a KV sink still reading them finishes first."""
        if seq.kv_sink is not None:
            seq.kv_sink.before_free()
        self.block_manager.free(seq.block_table)

    def _preempt(self, seq: Sequence) -> None:
        self.free_blocks(seq)
        seq.spec_token_ids.clear()
        seq.spec_draft_computed = 0
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def commit_step(self, batch: ScheduledBatch) -> None:
        """After the forward: the scheduled tokens now have KV; full blocks join the cache."""
        block_size = self.block_manager.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            old_full = seq.num_computed_tokens // block_size
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens // block_size > old_full:  # a block just filled
                self.block_manager.cache_full_blocks(seq.block_table, seq.block_hashes,
                                                     seq.num_computed_tokens, old_full)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a sequence wherever it is; frees its blocks unless it holds them for export."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if not seq.hold_kv:
            self.free_blocks(seq)
