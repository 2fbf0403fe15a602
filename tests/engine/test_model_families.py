"""Every supported family against transformers' own modeling code, on the same random weights
of a small config (float32, CPU): greedy tokens must be equal.

Covers what the embedded SmolLM2 does not: Qwen2's qkv bias, Qwen3's q/k norm, Mistral, Llama 3
rope scaling, untied embeddings. Weights go through a safetensors directory, the same loader
real checkpoints use.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from pagewire import LLM, SamplingParams

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)

CONFIGS = {
    "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3-rope-scaling": LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0),
    "mistral": MistralConfig(**COMMON, sliding_window=None),
    "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_family_matches_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name], dtype=torch.float32).eval()
    with torch.no_grad():  # transformers initialises norms to exactly 1: make them matter
        for pname, param in hf.named_parameters():
            if "norm" in pname:
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 40)]
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())

    llm = LLM(model=str(tmp_path), kv_cache_memory_bytes=8 << 20, show_progress=False)
    assert llm.get_tokenizer() is None
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_dummy_weights_load_a_config_without_checkpoint(tmp_path):
    CONFIGS["qwen3"].save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", kv_cache_memory_bytes=8 << 20,
              show_progress=False)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5


def test_missing_weights_are_a_clear_error(tmp_path):
    CONFIGS["llama"].save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        LLM(model=str(tmp_path), kv_cache_memory_bytes=8 << 20)
