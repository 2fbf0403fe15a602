"""Pre-quantized checkpoints under tensor and pipeline parallelism (CPU, gloo, one process per
rank). Each TP rank loads its slice of the stored tensors: packed words and groups cut along the
input of row-parallel layers (o_proj, down_proj), along the output of the others; W8A8 scales
follow their rows. TP=2 and PP=2 must give the single-process engine's answers on the same
checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pagewire import SamplingParams
from pagewire.model.quantization.gguf import PackedEmbedding
from pagewire.model.quantization.int8 import Int8Linear
from pagewire.model.quantization.weight_only import WeightOnlyLinear
from tests.engine.helpers import make_llm
from tests.engine.quantized_writers import write_quantized, write_w8a8

PROMPTS = [{"prompt_token_ids": list(range(n, n + 12))} for n in (3, 40, 100)]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)


def tiny_checkpoint(folder, fmt: str, bits: int = 4, act_order: bool = False) -> str:
    """A small random Llama (4 query heads of 16, 2 KV heads, 2 layers) stored in `fmt`;
    groups of 32, so each of two ranks' o_proj inputs (2 heads: 32 columns) is one group."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=False)
    state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    if fmt == "w8a8-int":
        write_w8a8(folder, config.to_dict(), state, "int", "channel")
    else:
        write_quantized(folder, config.to_dict(), state, fmt, bits, 32, act_order,
                        symmetric=fmt != "awq")
    return str(folder)


def answers(llm):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs[0])
            for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("fmt, bits, parallel", [
    ("gptq", 4, "tensor"), ("awq", 4, "tensor"), ("compressed-tensors", 8, "tensor"),
    ("gptq", 4, "pipeline")])
def test_weight_only_checkpoints_split_over_two_ranks_answer_as_one(tmp_path, fmt, bits,
                                                                    parallel):
    model = tiny_checkpoint(tmp_path, fmt, bits)
    single = answers(make_llm(model=model, kv_cache_memory_bytes=8 << 20))
    llm = make_llm(model=model, kv_cache_memory_bytes=8 << 20,
                   **{f"{parallel}_parallel_size": 2})
    try:
        runner = llm.engine.runner
        first_layer = runner.model.layers[0]
        down = first_layer.mlp.down_proj
        assert isinstance(down, WeightOnlyLinear) and down.bits == bits
        if parallel == "tensor":  # rank 0 holds half of down_proj's input, packed
            assert down.in_features == 64 and down.qweight.shape == (64 * bits // 32, 64)
        for (tokens_a, first_a), (tokens_b, first_b) in zip(single, answers(llm)):
            assert tokens_a == tokens_b
            assert set(first_a) == set(first_b)
            for token in first_a:  # partial sums added across ranks: float32 rounding only
                assert first_b[token].logprob == pytest.approx(first_a[token].logprob,
                                                               abs=1e-4)
    finally:
        runner.close()


def test_int8_w8a8_splits_its_rows_and_scales(tmp_path):
    """Row-parallel ranks quantize their own slice of each token's activations (a scale of
    their own), so the answer moves by that rounding only: first-token logprobs measured
    within 9e-4 of the single process's here (greedy tokens may part at a near-tie of this
    random model: one prompt of three does)."""
    model = tiny_checkpoint(tmp_path, "w8a8-int")
    single = answers(make_llm(model=model, kv_cache_memory_bytes=8 << 20))
    llm = make_llm(model=model, kv_cache_memory_bytes=8 << 20, tensor_parallel_size=2)
    try:
        qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv, Int8Linear) and qkv.weight_scale.shape == (64,)  # 2+1+1 heads
        for (_, first_a), (_, first_b) in zip(single, answers(llm)):
            for token in set(first_a) & set(first_b):
                assert first_b[token].logprob == pytest.approx(first_a[token].logprob,
                                                               abs=0.01)
    finally:
        llm.engine.runner.close()


def test_act_order_rows_are_refused_under_tensor_parallelism(tmp_path):
    model = tiny_checkpoint(tmp_path, "gptq", 4, act_order=True)
    with pytest.raises(ValueError, match="act-order"):
        make_llm(model=model, kv_cache_memory_bytes=8 << 20, tensor_parallel_size=2)


GGUF_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_gguf_held_packed_splits_over_two_ranks(parallel):
    """The embedded model's blocks (Q4_1 and its packed, tied embedding) under TP=2 (each rank
    its heads, widths and vocabulary rows, cut on whole words and groups) and PP=2 (the last
    stage's tied head: its own copy of the embedding's blocks) give the single process's
    greedy tokens and first-token logprobs."""
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    single = make_llm(quantization="gguf")
    expected = single.generate(GGUF_PROMPTS, greedy)
    llm = make_llm(quantization="gguf", **{f"{parallel}_parallel_size": 2})
    try:
        model = llm.engine.runner.model
        assert isinstance(model.embed_tokens, PackedEmbedding)
        if parallel == "tensor":  # half the vocabulary's columns on rank 0
            assert model.embed_tokens.layer.qweight.shape[1] == 49152 // 2
        for a, b in zip(expected, llm.generate(GGUF_PROMPTS, greedy)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
            assert set(first_a) == set(first_b)
            for token in first_a:
                assert first_b[token].logprob == pytest.approx(first_a[token].logprob,
                                                               abs=1e-4)
    finally:
        llm.engine.runner.close()
