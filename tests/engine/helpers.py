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
