"""Greedy tokens equal Hugging Face transformers' on the same GGUF weights (float32)."""

from __future__ import annotations

import pytest

from pagewire import SamplingParams
from tests.engine.helpers import hf_greedy, make_llm

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Translate to French: I would like a cup of coffee, please.",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three colors of the rainbow and explain how rainbows "
                                 "form, in detail, for a curious ten-year-old."}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompt_ids(llm):
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PLAIN_PROMPTS]
    ids += [llm.apply_chat_template(c) for c in CHATS]
    # a long prompt (several blocks, chunked when the step budget is small)
    ids.append(tok.encode(" ".join(PLAIN_PROMPTS * 6)))
    return ids


@pytest.fixture(scope="module")
def hf_tokens(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_greedy_matches_transformers_one_at_a_time(llm, prompt_ids, hf_tokens):
    for ids, expected in zip(prompt_ids, hf_tokens):
        out = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected


def test_greedy_matches_transformers_in_one_mixed_batch(llm, prompt_ids, hf_tokens):
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens


def test_greedy_matches_transformers_with_chunked_prefill(prompt_ids, hf_tokens):
    small_steps = make_llm(max_num_batched_tokens=40, max_num_seqs=4)
    outs = small_steps.generate([{"prompt_token_ids": ids} for ids in prompt_ids], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens


def test_text_and_chat_api(llm, hf_model):
    tok = llm.get_tokenizer()
    out = llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=32))[0]
    completion = out.outputs[0]
    expected = hf_greedy(hf_model, llm.apply_chat_template(CHATS[0]), 32)
    # The engine stops at <|im_end|>; transformers (EOS ignored) continues past it.
    assert completion.token_ids == expected[:len(completion.token_ids)]
    assert completion.finish_reason == "stop"
    assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)
    assert "4" in completion.text
