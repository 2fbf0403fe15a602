"""Engine behaviour on the real embedded model: preemption, prefix hits, sampling, stops."""

from __future__ import annotations

import pytest

from pagewire import SamplingParams
from pagewire.engine.llm_engine import InvalidRequestError
from tests.engine.helpers import hf_greedy, make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SYSTEM = ("You are a meticulous assistant for a shipping company. Always answer with the order "
          "number first, then the status, then the expected delivery date, in that order.")


def ids_of(llm, text):
    return llm.get_tokenizer().encode(text)


def test_preemption_under_tiny_cache_keeps_tokens_exact(llm):
    prompts = [{"prompt_token_ids": ids_of(llm, f"Story number {i}: the dragon and the")}
               for i in range(6)]
    roomy = llm.generate(prompts, GREEDY)
    # 9 blocks of 16 tokens for six sequences of ~27 tokens (two blocks) each: must preempt.
    tiny = make_llm(kv_cache_memory_bytes=9 * 737280, max_model_len=128)
    outs = tiny.generate(prompts, GREEDY)
    assert tiny.engine.stats.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tiny.engine.block_manager.num_free_blocks == tiny.engine.block_manager.num_blocks


def test_prefix_hit_computes_only_the_suffix_and_keeps_tokens(llm):
    engine = llm.engine
    first = llm.chat([{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Where is order 1?"}], GREEDY)[0]
    before = engine.stats.num_computed_tokens
    second_prompt = llm.apply_chat_template([{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": "Where is order 2?"}])
    second = llm.generate({"prompt_token_ids": second_prompt}, GREEDY)[0]
    computed = engine.stats.num_computed_tokens - before
    assert second.num_cached_tokens >= 32
    # prompt suffix + one token per decode step (the last sampled token is never computed)
    assert computed == len(second_prompt) - second.num_cached_tokens + GREEDY.max_tokens - 1
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < second.num_cached_tokens
    cold = make_llm(enable_prefix_caching=False)
    expected = cold.generate({"prompt_token_ids": second_prompt}, GREEDY)[0]
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    prompt = {"prompt_token_ids": ids_of(llm, "My favourite fruit is")}
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20)
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    again = llm.generate(prompt, params)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": ids_of(llm, f"Noise {i}")} for i in range(3)]
    batch = llm.generate(others + [prompt], [SamplingParams(temperature=1.0)] * 3 + [params])
    assert alone == again == batch[-1].outputs[0].token_ids
    other_seed = llm.generate(prompt, SamplingParams(temperature=1.0, seed=99, max_tokens=20))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples(llm):
    out = llm.generate("Pick a number:", SamplingParams(n=3, seed=5, max_tokens=8))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_truncates_text(llm):
    prompt = "1, 2, 3, 4,"
    free_run = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert " 7" in free_run.text
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=[" 7"]))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == " 7"
    assert completion.text == free_run.text[:free_run.text.index(" 7")]
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=[" 7"],
                                               include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == completion.text + " 7"


def test_stop_token_ids_and_max_tokens(llm):
    prompt = "1, 2, 3, 4,"
    free_run = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 8
    stop_id = free_run.token_ids[3]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                              stop_token_ids=[stop_id]))[0].outputs[0]
    first = free_run.token_ids.index(stop_id)
    assert out.token_ids == free_run.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_logprobs_match_transformers(llm, hf_model):
    import torch

    prompt_ids = ids_of(llm, "The capital of France is")
    out = llm.generate({"prompt_token_ids": prompt_ids},
                       SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt_ids])).logits[0, -1], -1)
    top = torch.topk(ref, 5)
    entry = out.logprobs[0]
    assert list(entry) == top.indices.tolist()
    for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
        assert entry[token_id].logprob == pytest.approx(value, abs=1e-4)
    assert out.token_ids[0] == top.indices[0].item()
    assert out.cumulative_logprob == pytest.approx(top.values[0].item(), abs=1e-4)
    assert hf_greedy(hf_model, prompt_ids, 1) == out.token_ids


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("to-abort", ids_of(llm, "A long story begins"), GREEDY)
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort_request("to-abort")
    assert out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([49152], "out of the vocabulary"),
    ([-1], "out of the vocabulary"),
    ([1] * 1024, "context"),
])
def test_bad_requests_raise_clear_errors(llm, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.engine.add_request("bad", prompt, GREEDY)
    assert "bad" not in llm.engine.seqs


def test_the_offline_api_takes_offline_step_defaults(llm):
    """LLM() is offline use: on a large GPU it gets vLLM's LLM-class step sizes."""
    assert llm.engine.config.usage == "offline"
    assert make_llm(usage="server").engine.config.usage == "server"
