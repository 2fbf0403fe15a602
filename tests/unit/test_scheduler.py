"""Scheduler behaviour without a model: token budgets, chunked prefill, preemption, prefix hits.

A tiny driver plays the model runner: after each step it commits the scheduled tokens and
appends one token to every sequence whose known tokens are all computed.
"""

from __future__ import annotations

from pagewire.engine.block_manager import BlockManager
from pagewire.engine.scheduler import Scheduler
from pagewire.engine.sequence import FinishReason, Sequence, SequenceStatus
from pagewire.sampling.params import SamplingParams

BLOCK = 4


def make(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64):
    bm = BlockManager(num_blocks, BLOCK)
    return bm, Scheduler(bm, max_num_seqs, max_num_batched_tokens)


def seq(rid, prompt, max_tokens=4):
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens), BLOCK)


def run_step(sched):
    """One step; finishes sequences at max_tokens; returns the scheduled batch."""
    batch = sched.schedule()
    sched.commit_step(batch)
    for s in batch.seqs:
        if s.num_computed_tokens == s.num_tokens:
            s.append_token(7)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
    return batch


def step(sched):
    """One step; returns {request_id: num_new_tokens}."""
    batch = run_step(sched)
    return {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens)}


def run_to_end(sched, limit=500):
    for _ in range(limit):
        if not sched.has_unfinished():
            return
        step(sched)
    raise AssertionError("scheduler did not finish")


def test_decode_and_prefill_share_one_step():
    bm, sched = make()
    sched.add(seq("a", range(10)))
    assert step(sched) == {"a": 10}
    sched.add(seq("b", range(100, 106)))
    assert step(sched) == {"a": 1, "b": 6}  # a decodes while b prefills, in one batch


def test_chunked_prefill_respects_token_budget():
    bm, sched = make(max_num_batched_tokens=16)
    sched.add(seq("long", range(40)))
    sched.add(seq("short", range(200, 203)))
    assert step(sched) == {"long": 16}
    assert step(sched) == {"long": 16}
    # the last chunk of the long prompt leaves room for the short one
    assert step(sched) == {"long": 8, "short": 3}
    assert step(sched) == {"long": 1, "short": 1}


def test_max_num_seqs_limits_running():
    bm, sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add(seq(str(i), range(i * 10, i * 10 + 5)))
    assert set(step(sched)) == {"0", "1"}
    assert len(sched.waiting) == 1


def test_preemption_by_recompute_under_tiny_cache():
    # 6 blocks of 4 tokens: two sequences of 8-token prompts + 8 outputs cannot both fit.
    bm, sched = make(num_blocks=6)
    a, b = seq("a", range(8), max_tokens=8), seq("b", range(50, 58), max_tokens=8)
    sched.add(a)
    sched.add(b)
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        preempted += [s.request_id for s in run_step(sched).preempted]
        bm.check_invariants()
    assert preempted and preempted[0] == "b"  # the newest is preempted first
    assert b.num_preemptions >= 1
    assert a.is_finished and b.is_finished
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked


def test_preempted_sequence_recomputes_prompt_and_outputs():
    bm, sched = make(num_blocks=4)
    a, b = seq("a", range(6), max_tokens=8), seq("b", range(30, 36), max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefill 6 tokens: 2 blocks each, the cache is full
    step(sched)  # tokens 7 and 8 still fit in the second blocks
    step(sched)
    assert b.num_preemptions == 0
    assert step(sched) == {"a": 1}  # a's 9th token needs a third block: b is preempted
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == []
    run_to_end(sched)
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hit_computes_only_the_suffix():
    bm, sched = make()
    shared_prefix = list(range(1000, 1012))  # 3 full blocks
    first = seq("first", shared_prefix + [1, 2], max_tokens=1)
    sched.add(first)
    run_to_end(sched)
    second = seq("second", shared_prefix + [3, 4, 5], max_tokens=1)
    sched.add(second)
    assert step(sched) == {"second": 3}  # 12 cached tokens skipped
    assert second.num_cached_tokens == 12


def test_full_prefix_hit_still_computes_the_last_token():
    bm, sched = make()
    prompt = list(range(500, 508))  # exactly two blocks
    sched.add(seq("a", prompt, max_tokens=1))
    run_to_end(sched)
    again = seq("b", prompt, max_tokens=1)
    sched.add(again)
    assert step(sched) == {"b": 4}  # one block reused; the last block recomputed for logits
    assert again.num_cached_tokens == 4


def test_finish_frees_blocks_unless_held():
    bm, sched = make()
    held = Sequence("h", list(range(9)), SamplingParams(max_tokens=1), BLOCK, hold_kv=True)
    sched.add(held)
    sched.add(seq("x", range(20, 29), max_tokens=1))
    run_to_end(sched)
    assert held.is_finished and len(held.block_table) == 3
    assert bm.num_free_blocks == bm.num_blocks - 3
    bm.free(held.block_table)
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_waiting_sequence():
    bm, sched = make(max_num_seqs=1)
    sched.add(seq("a", range(5)))
    sched.add(seq("b", range(5)))
    step(sched)
    b = sched.waiting[0]
    sched.finish(b, FinishReason.ABORT)
    assert b.finish_reason is FinishReason.ABORT and not sched.waiting


def test_pipeline_micro_batches_take_turns_and_stay_even():
    """Two micro-batches: each admits its share of the work, and a step holds only its own
    sequences, so no step holds a sequence whose previous token is still in the pipeline."""
    bm = BlockManager(64, BLOCK)
    sched = Scheduler(bm, 8, 64, num_micro_batches=2)
    for i in range(5):
        sched.add(seq(f"r{i}", range(10 * i, 10 * i + 6), max_tokens=8))
    assert step(sched) == {"r0": 6, "r1": 6, "r2": 6}  # its share: ceil(5 / 2)
    assert step(sched) == {"r3": 6, "r4": 6}
    assert step(sched) == {"r0": 1, "r1": 1, "r2": 1}  # turns alternate from then on
    assert step(sched) == {"r3": 1, "r4": 1}
    late = seq("late", range(90, 96))
    sched.add(late)
    assert step(sched) == {"r0": 1, "r1": 1, "r2": 1}  # its share is full: 3 of ceil(6 / 2)
    assert step(sched) == {"r3": 1, "r4": 1, "late": 6}
    assert {s.micro_batch for s in sched.running if s.request_id in ("r0", "late")} == {0, 1}
