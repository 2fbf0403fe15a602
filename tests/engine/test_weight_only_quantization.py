"""Weight-only checkpoints (GPTQ, AWQ, compressed-tensors' pack-quantized W4A16/W8A16) loaded in
their own packed layouts: a tiny Llama is quantized by each format's rules and written in its
exact packing (tests/engine/quantized_writers.py, which follows the formats' own packing code,
not pagewire's), next to the float32 weights the integers stand for. The engine on the packed
checkpoint must give what it gives on those float32 weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from pagewire import LLM, SamplingParams
from pagewire.model.quantization.weight_only import WeightOnlyLinear, pack_rows, unpack_rows
from tests.engine.quantized_writers import pack, quantization_config, write_quantized

GROUP = 32


def write_pair(folder, fmt: str, bits: int = 4, act_order: bool = False, symmetric: bool = True,
               shared_g_idx: bool = True) -> tuple[str, str]:
    """A small random Llama saved in `fmt` and as the float32 weights its integers stand for."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=False)
    state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    quantized, dense = folder / fmt, folder / "dense"
    reference = write_quantized(quantized, config.to_dict(), state, fmt, bits, GROUP, act_order,
                                symmetric, shared_g_idx)
    config.save_pretrained(dense)
    save_file(reference, dense / "model.safetensors")
    return str(quantized), str(dense)


# --- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_and_matches_the_formats_packing(bits):
    q = torch.randint(0, 1 << bits, (64, 24))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(packed, pack(q, bits, dim=0))  # GPTQ's qweight layout, exactly
    assert torch.equal(unpack_rows(packed, bits), q)


def test_weight_only_linear_against_its_float32_weight():
    torch.manual_seed(0)
    layer = WeightOnlyLinear(128, 48, 4, GROUP, torch.float32, act_order=True,
                             bias=torch.randn(48))
    layer.init_dummy(torch.Generator().manual_seed(1))
    layer.perm.copy_(torch.randperm(128))
    x = torch.randn(3, 5, 128)
    want = x @ layer.reference_weight().t() + layer.bias
    torch.testing.assert_close(layer(x), want)
    assert layer.reference_weight().std() == pytest.approx(0.02, rel=0.1)


# --- checkpoints through the engine -------------------------------------------------------------

CASES = [("gptq", 4, False, True), ("gptq", 4, True, True), ("gptq", 8, True, False),
         ("gptq", 4, False, False), ("awq", 4, False, False),
         ("compressed-tensors", 4, False, True), ("compressed-tensors", 4, True, False),
         ("compressed-tensors", 8, False, True)]


@pytest.mark.parametrize("fmt, bits, act_order, symmetric", CASES)
def test_checkpoint_gives_what_its_float32_weights_give(tmp_path, fmt, bits, act_order,
                                                        symmetric):
    quantized, dense = write_pair(tmp_path, fmt, bits, act_order, symmetric)
    packed = LLM(model=quantized, kv_cache_memory_bytes=8 << 20, show_progress=False)
    ref = LLM(model=dense, kv_cache_memory_bytes=8 << 20, show_progress=False)
    runner = packed.engine.runner
    assert runner.config.quantization == fmt  # detected from the checkpoint
    qkv = runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, WeightOnlyLinear) and (qkv.bits, qkv.group_size) == (bits, GROUP)
    assert (qkv.perm is not None) == act_order
    assert qkv.qweight.numel() * 4 == 64 * (64 + 2 * 32) * bits // 8  # 4 or 8 bits a weight
    prompts = [{"prompt_token_ids": list(range(n, n + 12))} for n in (3, 40, 100)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    for a, b in zip(packed.generate(prompts, params), ref.generate(prompts, params)):
        # The same float32 weights, computed as q * s + offset rather than (q - z) * s:
        # equal to float32 rounding.
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert set(first_a) == set(first_b)
        for token in first_a:
            assert first_a[token].logprob == pytest.approx(first_b[token].logprob, abs=1e-4)


def test_fused_projections_with_different_act_orders_are_refused(tmp_path):
    quantized, _ = write_pair(tmp_path, "gptq", act_order=True, shared_g_idx=False)
    with pytest.raises(ValueError, match="differs from the other projections fused"):
        LLM(model=quantized, kv_cache_memory_bytes=8 << 20, show_progress=False)


@pytest.mark.parametrize("config, match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ gemv"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ with 3 bits"),
    ({"quant_method": "bitsandbytes"}, "pre-quantized .'bitsandbytes'"),
])
def test_unsupported_variants_are_refused_at_start(tmp_path, config, match):
    llama = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    llama.quantization_config = config
    llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        LLM(model=str(tmp_path), load_format="dummy", show_progress=False)


def test_dummy_weights_of_a_packed_config_run(tmp_path):
    """Benchmarks run W4A16 on real shapes from a config alone (load_format dummy)."""
    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    llama.quantization_config = quantization_config("compressed-tensors", 4, GROUP, False, True)
    llama.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", kv_cache_memory_bytes=8 << 20,
              show_progress=False)
    layer = llm.engine.runner.model.layers[1].mlp.down_proj
    assert isinstance(layer, WeightOnlyLinear)
    assert layer.reference_weight().std() == pytest.approx(0.02, rel=0.1)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4

