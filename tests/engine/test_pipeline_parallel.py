"""Pipeline parallelism on CPU (gloo, one process per stage): the embedded model's 30 layers
in two stages of 15 give the single-process engine's greedy tokens and the very same logprobs
(each layer's arithmetic is unchanged; only the hidden states travel), with two micro-batches in
the pipeline or one step at a time; KV moves between PP sizes; TP x PP; a dead stage fails the
engine's next step."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from pagewire import SamplingParams
from pagewire.model.llama import ModelSpec
from pagewire.parallel.partition import PipelineStage, Slice
from pagewire.parallel.pipeline import stage_name
from tests.engine.helpers import (
    assert_a_killed_rank_fails_the_next_step,
    assert_kv_moves,
    make_llm,
)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]


def test_stages_take_consecutive_layers_and_their_own_tensors():
    spec = ModelSpec.from_hf_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))
    first, last = (PipelineStage.of(spec, rank, 2) for rank in range(2))
    assert (first.layers, last.layers) == (Slice(0, 3), Slice(3, 2))
    assert last.local_spec(spec).num_layers == 2
    assert stage_name("layers.4.mlp.down_proj.weight", last, True) == \
        "layers.1.mlp.down_proj.weight"
    assert stage_name("layers.4.mlp.down_proj.weight", first, True) is None
    assert stage_name("embed_tokens.weight", first, True) == "embed_tokens.weight"
    assert stage_name("embed_tokens.weight", last, True) == "lm_head.weight"  # tied head
    assert stage_name("norm.weight", first, True) is None
    with pytest.raises(ValueError, match="cannot split"):
        PipelineStage.of(spec, 0, 6)


@pytest.fixture(scope="module")
def pp_llm():
    llm = make_llm(pipeline_parallel_size=2)
    yield llm
    llm.engine.runner.close()


@pytest.mark.parametrize("stages", [2, 3])
def test_a_micro_batch_per_stage_gives_the_same_tokens(llm, stages):
    """async_scheduling=True: a micro-batch per stage, taken in turn, each stage on another at
    once: up to stages - 1 steps in flight beside the one launched (the default holds one
    step in the pipeline; the test below checks it)."""
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    micro = make_llm(pipeline_parallel_size=stages, async_scheduling=True)
    engine = micro.engine
    depths = []
    step = engine.step
    engine.step = lambda *a, **k: (step(*a, **k), depths.append(len(engine._in_flight)))[0]
    try:
        assert engine.scheduler.num_micro_batches == stages
        prompts = [f"{p} {i}" for i, p in enumerate((PROMPTS * 2)[:2 * stages])]  # 2 each
        for a, b in zip(llm.generate(prompts, greedy), micro.generate(prompts, greedy)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert engine.stats.num_steps >= stages * 16  # each micro-batch its own steps
        assert max(depths) == stages - 1
    finally:
        micro.engine.runner.close()


def test_two_stages_give_the_single_process_tokens_and_logprobs(llm, pp_llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for a, b in zip(llm.generate(PROMPTS, greedy), pp_llm.generate(PROMPTS, greedy)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    first = SamplingParams(temperature=0, max_tokens=1, logprobs=10)
    a = llm.generate(PROMPTS[1], first)[0].outputs[0].logprobs[0]
    b = pp_llm.generate(PROMPTS[1], first)[0].outputs[0].logprobs[0]
    assert {t: lp.logprob for t, lp in a.items()} == {t: lp.logprob for t, lp in b.items()}
    runner = pp_llm.engine.runner
    assert len(runner.model.layers) == 15 and runner.kv_cache.shape[0] == 15
    assert pp_llm.engine.scheduler.num_micro_batches == 1


def test_a_killed_stage_fails_the_next_step_within_seconds():
    assert_a_killed_rank_fails_the_next_step(pipeline_parallel_size=2)


@pytest.mark.parametrize("direction", ["pp2_to_pp1", "pp1_to_pp2"])
def test_kv_moves_between_engines_of_different_pp_sizes(llm, pp_llm, direction):
    """What leaves a pipeline engine has every layer (gathered from the stages), and what
    enters it is cut by stage: a prefill at PP=2 continues at PP=1, and the reverse."""
    source, target = (pp_llm, llm) if direction == "pp2_to_pp1" else (llm, pp_llm)
    assert_kv_moves(llm, source, target, direction)


def test_tensor_and_pipeline_parallel_together(llm):
    """TP=2 x PP=2, four processes: each stage's two ranks split its layers' heads (6+3 query
    heads) and all-reduce among themselves; activations go stage to stage rank for rank. The
    greedy tokens are the single process's, and KV leaves with every layer and head."""
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    both = make_llm(tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        runner = both.engine.runner
        assert len(runner.followers) == 3 and runner.kv_cache.shape[0] == 15
        assert runner.kv_cache.shape[-2] == 2  # rank 0: KV heads 0 and 1 of layers 0-14
        for a, b in zip(llm.generate(PROMPTS, greedy), both.generate(PROMPTS, greedy)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert_kv_moves(llm, both, llm, "tp2pp2_to_one")
        assert_kv_moves(llm, llm, both, "one_to_tp2pp2")
    finally:
        both.engine.runner.close()
