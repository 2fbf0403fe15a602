"""kv_cache_dtype="fp8": a cache of float8_e4m3 values, half the bytes of bf16 (a quarter of
float32), read back through the same attention paths. Lossy by design: these tests bound the
loss against transformers and check that KV moves only between caches of one type."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagewire import SamplingParams
from pagewire.engine.kv_transfer import KVLayoutMismatch
from tests.engine.helpers import SMALL_KV, hf_greedy, make_llm
from tests.engine.test_hf_parity import PLAIN_PROMPTS
from tests.engine.test_kv_transfer import PROMPT, prefill

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def fp8_llm():
    return make_llm(kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def prompt_ids(llm):
    tok = llm.get_tokenizer()
    return [tok.encode(p) for p in PLAIN_PROMPTS] + [tok.encode(" ".join(PLAIN_PROMPTS * 6))]


def test_the_cache_holds_fp8_and_more_tokens_in_the_same_bytes(llm, fp8_llm):
    runner = fp8_llm.engine.runner
    assert runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8_llm.engine.config.kv_cache_memory_bytes == SMALL_KV
    # float32 on CPU: four times the blocks in the same budget
    assert runner.kv_info.num_blocks == 4 * llm.engine.runner.kv_info.num_blocks


def test_greedy_stays_close_to_transformers(llm, fp8_llm, hf_model, prompt_ids):
    """Measured on the embedded model: every first token agrees with transformers and its
    logprob moves by < 0.2 nats from the float32 cache's; 4 of 6 prompts agree for all 24
    tokens (3 mantissa bits do move near-ties)."""
    exact = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], GREEDY)
    lossy = fp8_llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], GREEDY)
    agree_all = 0
    for ids, fp32, fp8 in zip(prompt_ids, exact, lossy):
        expected = hf_greedy(hf_model, ids, NEW_TOKENS)
        tokens = fp8.outputs[0].token_ids
        assert tokens[0] == expected[0] == fp32.outputs[0].token_ids[0]
        drift = abs(fp8.outputs[0].logprobs[0][tokens[0]].logprob
                    - fp32.outputs[0].logprobs[0][tokens[0]].logprob)
        assert 0 < drift < 0.25  # > 0: the values really went through fp8
        agree_all += tokens == expected
    assert agree_all >= len(prompt_ids) // 2


def test_export_import_between_fp8_caches_continues_exactly(fp8_llm):
    params = dataclasses.replace(GREEDY, logprobs=None)
    prompt_ids = fp8_llm.get_tokenizer().encode(PROMPT)
    expected = fp8_llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0]
    first = prefill(fp8_llm.engine, "fp8", prompt_ids, dataclasses.replace(params, max_tokens=1))
    data = fp8_llm.engine.export_kv("fp8")
    fp8_llm.engine.release("fp8")

    decode = make_llm(kv_cache_dtype="fp8").engine
    decode.import_kv("fp8", prompt_ids, first, data, params)
    while decode.has_unfinished_requests():
        outputs = decode.step()
    assert outputs[-1].outputs[0].token_ids == expected.token_ids


def test_fp8_kv_is_refused_by_a_cache_of_another_type(llm, fp8_llm):
    prompt_ids = fp8_llm.get_tokenizer().encode(PROMPT)
    first = prefill(fp8_llm.engine, "mixed", prompt_ids, dataclasses.replace(GREEDY,
                                                                              max_tokens=1))
    data = fp8_llm.engine.export_kv("mixed")
    fp8_llm.engine.release("mixed")
    free = llm.engine.block_manager.num_free_blocks
    with pytest.raises(KVLayoutMismatch, match="dtype: 'float32' here, 'float8_e4m3fn'"):
        llm.engine.import_kv("mixed", prompt_ids, first, data, GREEDY)
    assert llm.engine.block_manager.num_free_blocks == free


def test_unknown_kv_cache_dtype_is_refused_at_construction():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        make_llm(kv_cache_dtype="int4")
