"""Async scheduling (step N+1 launched before step N's tokens are read back) must give exactly
what the plain loop gives: the same tokens, text, logprobs and finish reasons, the same prefix
cache, and every block freed. On CPU the overlap buys nothing, but the bookkeeping is the same
code the GPU runs, so it is tested here against the synchronous engine."""

from __future__ import annotations

import pytest

from pagewire import SamplingParams
from tests.engine.helpers import make_llm

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def async_llm():
    return make_llm(async_scheduling=True)


def _results(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
             o.outputs[0].stop_reason) for o in outputs]


def _assert_idle(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine._in_flight
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0),  # EOS active: some stop early
    SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7),
    SamplingParams(max_tokens=30, temperature=0, stop=[".", "\n"],
                   include_stop_str_in_output=True),
    SamplingParams(max_tokens=16, temperature=0, min_tokens=12, stop_token_ids=[13, 30]),
    SamplingParams(max_tokens=12, temperature=0, logprobs=3),
    SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3,
                   frequency_penalty=0.5),
], ids=["greedy", "seeded", "stop-strings", "min-tokens", "logprobs", "penalties"])
def test_async_scheduling_matches_the_plain_loop(llm, async_llm, params):
    expected = llm.generate(PROMPTS, params)
    got = async_llm.generate(PROMPTS, params)
    assert _results(got) == _results(expected)
    if params.logprobs:
        for a, b in zip(got, expected):
            assert [sorted(d) for d in a.outputs[0].logprobs] == \
                [sorted(d) for d in b.outputs[0].logprobs]
    _assert_idle(async_llm)


def test_async_scheduling_computes_no_token_past_max_tokens(llm, async_llm):
    """A request ending by length is not scheduled again while its last token is in flight."""
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    counts = []
    for engine_llm in (llm, async_llm):
        before = engine_llm.engine.stats.num_computed_tokens
        engine_llm.generate(PROMPTS, params)
        counts.append(engine_llm.engine.stats.num_computed_tokens - before)
    assert counts[0] == counts[1]


def test_async_scheduling_overlaps_and_drops_void_tokens(async_llm):
    """The next step is launched before this one is read back; a request stopped by a stop
    string while its next token was in flight gets nothing past the stop."""
    engine = async_llm.engine
    engine.add_request("a", engine.tokenizer.encode("Count: 1, 2, 3,"),
                       SamplingParams(max_tokens=20, temperature=0, stop=[","]))
    engine.add_request("b", engine.tokenizer.encode("Count: 1, 2, 3,"),
                       SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    seen_in_flight = False
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        seen_in_flight |= bool(engine._in_flight)
    assert seen_in_flight
    assert "," not in finished["a"].outputs[0].text
    assert finished["a"].outputs[0].finish_reason == "stop"
    assert len(finished["b"].outputs[0].token_ids) == 20
    _assert_idle(async_llm)


def test_async_scheduling_keeps_the_prefix_cache(llm, async_llm):
    """Blocks completed by a token that was still on the device join the cache once it lands."""
    prompt = PROMPTS[3]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    hits = []
    for engine_llm in (llm, async_llm):
        first = engine_llm.generate([prompt], params)[0]
        # The whole first answer as a prompt: its full blocks, output included, must hit.
        again = engine_llm.engine.tokenizer.encode(prompt) + first.outputs[0].token_ids
        before = engine_llm.engine.stats.num_prefix_hit_tokens
        engine_llm.generate([{"prompt_token_ids": again}], SamplingParams(max_tokens=1))
        hits.append(engine_llm.engine.stats.num_prefix_hit_tokens - before)
    assert hits[0] == hits[1] > 0
    _assert_idle(async_llm)


def test_async_scheduling_survives_preemption_and_abort():
    # 9 blocks of 16 tokens for five sequences of up to ~60 tokens: must preempt.
    tiny = make_llm(async_scheduling=True, kv_cache_memory_bytes=9 * 737280, max_model_len=128)
    plain = make_llm(async_scheduling=False, kv_cache_memory_bytes=9 * 737280, max_model_len=128)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    assert _results(tiny.generate(PROMPTS, params)) == _results(plain.generate(PROMPTS, params))
    assert tiny.engine.stats.num_preemptions > 0
    _assert_idle(tiny)

    engine = tiny.engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), engine.tokenizer.encode(prompt), params)
    for _ in range(3):
        engine.step()
    assert engine._in_flight
    engine.abort_request("1")  # its token is still on the device
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            done[output.request_id] = output
    assert set(done) == {"0", "2"}
    _assert_idle(tiny)
