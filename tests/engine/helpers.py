"""Helpers for engine tests: a small engine and transformers' greedy reference."""

from __future__ import annotations

import torch

# A small KV budget keeps each engine's cache cheap; tests that need a tiny cache ask for one.
SMALL_KV = 64 << 20


def make_llm(**kwargs):
    from pagewire import LLM

    kwargs.setdefault("kv_cache_memory_bytes", SMALL_KV)
    kwargs.setdefault("max_model_len", 1024)
    kwargs.setdefault("show_progress", False)
    return LLM(**kwargs)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate, greedy, EOS ignored (so every token is compared)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=None,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def assert_a_killed_rank_fails_the_next_step(**parallel) -> None:
    """An engine of several ranks (tensor_parallel_size or pipeline_parallel_size): rank 1
    killed, the next step raises within seconds (its collective finds the peer gone)."""
    import time

    import pytest

    from pagewire import SamplingParams

    llm = make_llm(**parallel)
    follower = llm.engine.runner.followers[0]
    follower.kill()
    follower.wait()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="Connection|closed|reset|Broken"):
        llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4))
    assert time.monotonic() - start < 30
    llm.engine.runner.close()


KV_PROMPT = ("In a distant galaxy, a small robot named Pip discovered an ancient map. The map "
             "showed a path through seven nebulae to a planet made of glass, and Pip decided to")


def assert_kv_moves(reference, source, target, request_id: str) -> None:
    """A prompt prefilled on `source`, its KV exported and imported into `target`, continues
    there as the single-process `reference` engine answers it, token for token; both engines
    end with every block free."""
    from pagewire import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt_ids = reference.get_tokenizer().encode(KV_PROMPT)
    expected = reference.generate({"prompt_token_ids": prompt_ids}, params)[0]
    engine = source.engine
    engine.add_request(request_id, prompt_ids, SamplingParams(temperature=0, max_tokens=1),
                       hold_kv=True)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    first = outputs[-1].outputs[0].token_ids
    data = engine.export_kv(request_id)
    engine.release(request_id)
    target.engine.import_kv(request_id, prompt_ids, first, data, params)
    while target.engine.has_unfinished_requests():
        outputs = target.engine.step()
    assert outputs[-1].outputs[0].token_ids == expected.outputs[0].token_ids
    for side in (source, target):
        manager = side.engine.block_manager
        assert manager.num_free_blocks == manager.num_blocks
