"""The draft-model proposer on the embedded model: as its own draft every draft is accepted
and greedy output is unchanged; a perturbed copy of it is accepted less often, still without
changing greedy output."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagewire import SamplingParams
from pagewire.model.model_source import embedded_gguf_path, resolve_model
from tests.engine.helpers import make_llm

PROMPTS = ["def area(width, height):\n    return width * height\n\ndef",
           "The capital of France is", "List three colours: red,"]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
DRAFT_KV = 128 << 20  # the budget holds the target's and the draft's caches


def draft_config(model: str) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": 3,
            "disable_by_batch_size": 64}


@pytest.fixture(scope="module")
def plain_tokens():
    llm = make_llm()
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def perturbed_copy(tmp_path_factory):
    """The embedded model's converted folder with noise added to its MLP weights."""
    source = resolve_model(None)
    folder = tmp_path_factory.mktemp("perturbed")
    shutil.copytree(source.model_dir, folder, dirs_exist_ok=True)
    (weights_file,) = folder.glob("*.safetensors")
    weights = load_file(weights_file)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if "mlp" in name:
            noise = torch.randn(tensor.shape, generator=generator) * tensor.std() * 0.5
            weights[name] = (tensor + noise.to(tensor.dtype)).contiguous()
    save_file(weights, weights_file)
    return str(folder)


def test_the_model_as_its_own_draft_is_always_accepted(plain_tokens):
    llm = make_llm(speculative_config=draft_config(str(embedded_gguf_path())),
                   kv_cache_memory_bytes=DRAFT_KV)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == plain_tokens
    stats = llm.engine.speculator.stats
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    # Sampled: q == p, so every draft passes u * q < p.
    llm.generate(PROMPTS, SamplingParams(temperature=0.9, seed=0, max_tokens=32))
    assert stats.acceptance_rate > 0.99
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_perturbed_draft_is_accepted_less_and_changes_nothing(plain_tokens, perturbed_copy):
    llm = make_llm(speculative_config=draft_config(perturbed_copy), kv_cache_memory_bytes=DRAFT_KV)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == plain_tokens
    stats = llm.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_draft_of_another_vocabulary_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=100).save_pretrained(
        tmp_path)
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(speculative_config=draft_config(str(tmp_path)))
