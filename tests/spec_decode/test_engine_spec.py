"""Speculative decoding in the engine, on the embedded model (float32, CPU): greedy tokens equal
plain greedy, batched and alone, for chat and plain prompts; rejected drafts leave no blocks and
no cached prefix behind; stop strings, logprobs and the off switches behave."""

from __future__ import annotations

import pytest

from pagewire import SamplingParams
from pagewire.engine.prefix_hash import extend_block_hashes
from tests.engine.helpers import make_llm

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2, "disable_by_batch_size": 64}

CODE = ("def area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n")
CHATS = [
    [{"role": "user", "content": "Repeat exactly, then stop: " + CODE}],
    [{"role": "user", "content": "Copy this list: apples, pears, plums, apples, pears, plums."}],
]
PLAIN = [CODE + "\n# the same functions again:\n" + CODE[:40],
         "one two three four one two three four one two"]


@pytest.fixture(scope="module")
def plain_llm():
    return make_llm()


@pytest.fixture(scope="module")
def spec_llm():
    return make_llm(speculative_config=NGRAM)


def prompts_of(llm) -> list[dict]:
    chats = [{"prompt_token_ids": llm.apply_chat_template(c)} for c in CHATS]
    return chats + [{"prompt_token_ids": llm.get_tokenizer().encode(p)} for p in PLAIN]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


GREEDY = SamplingParams(temperature=0, max_tokens=48)


def test_greedy_with_speculation_equals_greedy_batched(plain_llm, spec_llm):
    prompts = prompts_of(plain_llm)
    before = spec_llm.engine.speculator.stats.num_accepted_tokens
    assert token_ids(spec_llm.generate(prompts, GREEDY)) == \
        token_ids(plain_llm.generate(prompts, GREEDY))
    assert spec_llm.engine.speculator.stats.num_accepted_tokens > before  # it did speculate
    metrics = {m.name: m.value for m in spec_llm.get_metrics()}
    assert metrics["pagewire:spec_decode_num_accepted_tokens"] > before
    assert metrics["pagewire:spec_decode_num_draft_tokens"] >= \
        metrics["pagewire:spec_decode_num_accepted_tokens"]
    per_position = metrics["pagewire:spec_decode_num_accepted_tokens_per_pos"]
    assert len(per_position) == 4 and sum(per_position) == \
        metrics["pagewire:spec_decode_num_accepted_tokens"]


def test_greedy_with_speculation_equals_greedy_alone(plain_llm, spec_llm):
    for prompt in prompts_of(plain_llm):
        assert token_ids(spec_llm.generate(prompt, GREEDY)) == \
            token_ids(plain_llm.generate(prompt, GREEDY))


def test_rejected_drafts_leave_no_blocks_and_no_cached_prefix(spec_llm):
    engine = spec_llm.engine
    manager, stats = engine.block_manager, engine.speculator.stats
    manager.reset_prefix_cache()  # from here on, the cache holds only what this run stores
    rejected_before = stats.num_draft_tokens - stats.num_accepted_tokens
    outputs = spec_llm.generate(prompts_of(spec_llm), SamplingParams(temperature=0.8, seed=3,
                                                                     max_tokens=64))
    assert stats.num_draft_tokens - stats.num_accepted_tokens > rejected_before
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    real: set[int] = set()  # every block hash of what was really generated
    for out in outputs:
        hashes: list[int] = []
        extend_block_hashes(hashes, out.prompt_token_ids + out.outputs[0].token_ids,
                            engine.config.block_size)
        real.update(hashes)
    cached = set(manager.cached_hashes())
    assert cached, "the run cached nothing"
    assert cached <= real  # never a block that held rejected drafts


def test_stop_strings_and_logprobs_match_plain_decoding(plain_llm, spec_llm):
    prompt = prompts_of(plain_llm)[2]
    params = SamplingParams(temperature=0, max_tokens=60, stop=["perimeter"], logprobs=2)
    plain, spec = plain_llm.generate(prompt, params)[0], spec_llm.generate(prompt, params)[0]
    assert spec.outputs[0].text == plain.outputs[0].text
    assert spec.outputs[0].finish_reason == plain.outputs[0].finish_reason == "stop"
    assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
    for a, b in zip(spec.outputs[0].logprobs, plain.outputs[0].logprobs):
        assert a.keys() == b.keys()
        for token in a:
            assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-3)


def test_poor_acceptance_turns_a_request_off():
    llm = make_llm(speculative_config={**NGRAM, "min_acceptance_rate": 1.0, "warmup_drafts": 4})
    # Sampled at a high temperature, drafts are mostly rejected: once 4 draft tokens have
    # been judged and any was rejected, the request drafts no more.
    llm.generate(prompts_of(llm)[3], SamplingParams(temperature=1.5, seed=0, max_tokens=64))
    stats = llm.engine.speculator.stats
    assert 4 <= stats.num_draft_tokens < 4 + 4 + 1
    assert stats.num_accepted_tokens < stats.num_draft_tokens


def test_a_big_batch_does_not_speculate():
    llm = make_llm(speculative_config={**NGRAM, "disable_by_batch_size": 1})
    prompts = prompts_of(llm)
    # Two at once, to the same length: above the threshold at every step.
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert llm.engine.speculator.stats.num_drafts == 0
    llm.generate(prompts[2], GREEDY)  # alone: speculates
    assert llm.engine.speculator.stats.num_drafts > 0


def test_a_bad_speculative_config_is_a_clear_error():
    with pytest.raises(ValueError, match="speculative method"):
        make_llm(speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown speculative config keys"):
        make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "k": 1})


def test_penalties_and_grammars_decode_as_without_speculation(plain_llm, spec_llm):
    """Sequences the verifier cannot replay per position (penalties, a grammar) decode one token
    a step beside speculating ones, so their output is what it is without speculation."""
    from pagewire import StructuredOutputsParams

    prompts = prompts_of(plain_llm)
    penalised = SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.3,
                               frequency_penalty=0.5)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
              "required": ["name"]}
    constrained = SamplingParams(temperature=0, max_tokens=40,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    mixed = [penalised, constrained, GREEDY, GREEDY]
    before = spec_llm.engine.speculator.stats.num_drafts
    spec = spec_llm.generate(prompts, mixed)
    assert spec_llm.engine.speculator.stats.num_drafts > before  # the greedy two speculated
    assert token_ids(spec) == token_ids(plain_llm.generate(prompts, mixed))
    assert spec[1].outputs[0].text.startswith('{"name": "')


@pytest.mark.parametrize("parallel, method", [("pipeline", "ngram"), ("tensor", "draft_model")])
def test_speculation_under_parallelism_equals_greedy(plain_llm, parallel, method):
    """Drafts are proposed and verified on rank 0 (a draft model, here the model itself, beside
    its shard, on its own cache); the other ranks run the verify step as any other. Under PP
    the verify step's rows come back with its logits (StepResult.sample_later), and rejected
    drafts roll back."""
    from pagewire.model.model_source import embedded_gguf_path

    config = NGRAM if method == "ngram" else {
        "method": "draft_model", "model": embedded_gguf_path(), "num_speculative_tokens": 3}
    prompts = [{"prompt_token_ids": plain_llm.get_tokenizer().encode(p)} for p in PLAIN]
    llm = make_llm(speculative_config=config, kv_cache_memory_bytes=128 << 20,
                   **{f"{parallel}_parallel_size": 2})
    try:
        assert token_ids(llm.generate(prompts, GREEDY)) == \
            token_ids(plain_llm.generate(prompts, GREEDY))
        stats = llm.engine.speculator.stats
        assert stats.num_accepted_tokens > 0
        if method == "ngram":  # some drafts were rejected: their KV rolled back
            assert stats.num_accepted_tokens < stats.num_draft_tokens
    finally:
        llm.engine.runner.close()
