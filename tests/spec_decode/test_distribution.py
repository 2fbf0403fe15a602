"""End to end on a small-vocabulary model: sampled with n-gram speculation, each output position
has the distribution it has without speculation (chi-square homogeneity over many seeded
samples). Random weights of a real config; the prompt recurs, so nearly every step drafts,
and both acceptance and the residual draw are exercised."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from pagewire import LLM, SamplingParams
from tests.spec_decode.chi_square import homogeneity, p_value

VOCAB = 16
N = 3000
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                         max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper than the default init: distributions far from uniform
        model.lm_head.weight.mul_(8)
    model.save_pretrained(folder)
    return str(folder)


def sample(model_dir: str, speculative_config: dict | None) -> tuple[torch.Tensor, object]:
    llm = LLM(model=model_dir, kv_cache_memory_bytes=32 << 20, show_progress=False,
              speculative_config=speculative_config)
    # The prompt: the model's own greedy text, which settles into a loop, so the drafts
    # (what followed before) are often what the model would say, and often not.
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    start = llm.generate({"prompt_token_ids": list(range(VOCAB))}, greedy, use_tqdm=False)
    prompt = {"prompt_token_ids": list(range(VOCAB)) + start[0].outputs[0].token_ids}
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=NEW_TOKENS,
                             ignore_eos=True) for i in range(N)]
    outs = llm.generate([prompt] * N, params, use_tqdm=False)
    return torch.tensor([o.outputs[0].token_ids for o in outs]), llm.engine.speculator


def test_speculation_keeps_every_positions_distribution(model_dir):
    plain, _ = sample(model_dir, None)
    spec, speculator = sample(model_dir, {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 2, "disable_by_batch_size": 1 << 20, "min_acceptance_rate": 0})
    stats = speculator.stats
    assert stats.num_draft_tokens > N  # nearly every step drafted...
    assert 0.05 < stats.acceptance_rate < 0.95, stats  # ...and both outcomes happened often
    for position in range(1, NEW_TOKENS):  # position 0 is sampled by the prefill step
        a = torch.bincount(plain[:, position], minlength=VOCAB).tolist()
        b = torch.bincount(spec[:, position], minlength=VOCAB).tolist()
        stat, df = homogeneity(a, b)
        assert p_value(stat, df) > 1e-3, (position, a, b)
    # The pair (second, third token): their joint distribution too.
    pairs = lambda t: (t[:, 1] * VOCAB + t[:, 2])  # noqa: E731
    a = torch.bincount(pairs(plain), minlength=VOCAB ** 2).tolist()
    b = torch.bincount(pairs(spec), minlength=VOCAB ** 2).tolist()
    stat, df = homogeneity(a, b)
    assert p_value(stat, df) > 1e-3
