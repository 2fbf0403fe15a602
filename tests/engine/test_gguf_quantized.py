"""GGUF kept quantized (`quantization="gguf"`): each block format's integers, scales and offsets
against gguf's own dequantizer (blocks made by gguf's quantizer where it has one, random valid
bytes for the K-quants), and the embedded model (Q4_1 projections) held packed against the
default path's float32 copy of the same file.

Measured (loadtests/RESULTS.md, issue 17): next-token top-10 logprobs within 2.3e-5 of float32
on four prompts, and greedy answers equal for all 64 tokens of each; the model takes 97.8 MiB
against 517 MiB in float32, for a 93.8 MiB file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from pagewire import SamplingParams
from pagewire.model.model_source import embedded_gguf_path
from pagewire.model.quantization.gguf import FORMATS, PackedEmbedding, block_integers
from pagewire.model.quantization.weight_only import WeightOnlyLinear
from tests.engine.helpers import make_llm


def _blocks(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """uint8 [rows, bytes per row] of valid `kind` blocks."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[kind]
    if kind in ("Q4_0", "Q4_1", "Q8_0"):  # gguf's own quantizer
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    values, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // values, block_bytes), dtype=np.uint8)
    # Random bytes are valid blocks except where they make f16 scales NaN/inf: set those.
    d = rng.uniform(1e-3, 2e-2, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if kind == "Q4_K":
        raw[:, 0:4] = d  # d, dmin
    else:
        raw[:, -2:] = d[:, 0:2]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_block_integers_are_ggufs_own_dequantization(kind):
    rows, cols = 3, 512
    raw = _blocks(kind, rows, cols, seed=len(kind))
    qtype = GGMLQuantizationType[kind]
    want = dequantize(raw, qtype).reshape(rows, cols)
    bits, group = FORMATS[kind]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    q, scales, offsets = block_integers(kind, raw.reshape(-1, block_bytes))
    assert q.min() >= 0 and q.max() < (1 << bits)
    assert len(scales) == len(offsets) == rows * cols // group
    got = (q.reshape(-1, group) * scales[:, None] + offsets[:, None]).reshape(rows, cols)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]


@pytest.fixture(scope="module")
def gguf_llm():
    return make_llm(quantization="gguf")


def test_embedded_model_held_packed_gives_the_float32_answers(llm, gguf_llm):
    model = gguf_llm.engine.runner.model
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, WeightOnlyLinear) and (qkv.bits, qkv.group_size) == (4, 32)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=10)
    for prompt in PROMPTS:
        a = llm.generate(prompt, params)[0].outputs[0].logprobs[0]
        b = gguf_llm.generate(prompt, params)[0].outputs[0].logprobs[0]
        assert set(a) == set(b)
        for token in a:  # the same numbers, summed in another order
            assert b[token].logprob == pytest.approx(a[token].logprob, abs=1e-4)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for a, b in zip(llm.generate(PROMPTS, greedy), gguf_llm.generate(PROMPTS, greedy)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_the_model_takes_about_its_files_bytes(gguf_llm):
    """Q4_1 is 20 bytes per 32 weights (f16 d and m, 16 bytes of nibbles): the layout's nibbles
    plus f16 scales and offsets are exactly that. Q8_0 (the tied embedding) is 34 bytes per 32;
    held unsigned with an f16 offset beside the f16 scale, 36."""
    path = embedded_gguf_path()
    reader = GGUFReader(str(path))
    projections = sum(t.data.nbytes for t in reader.tensors
                      if t.name.startswith("blk.") and "norm" not in t.name)
    embedding = next(t.data.nbytes for t in reader.tensors if t.name == "token_embd.weight")
    model = gguf_llm.engine.runner.model
    assert isinstance(model.embed_tokens, PackedEmbedding)

    def held(modules):
        return sum(b.numel() * b.element_size() for m in modules
                   for b in (m.qweight, m.scales, m.offsets))

    assert held(m for m in model.modules() if isinstance(m, WeightOnlyLinear)
                and m is not model.embed_tokens.layer) == projections
    assert held([model.embed_tokens.layer]) == embedding * 36 // 34
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert total < path.stat().st_size * 1.05  # measured: 97.8 MiB for a 93.8 MiB file


def test_gguf_needs_a_gguf_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a .gguf model"):
        make_llm(model=str(tmp_path), load_format="dummy", quantization="gguf")



def test_a_fused_layer_of_mixed_types_takes_the_widest_layout():
    """llama.cpp's Q4_K_M stores v (and down) in Q6_K beside Q4_K: q, k and v, fused in one
    layer, are all held as 8-bit values in groups of 16, each Q4_K group's scale and offset
    repeated over its two halves; the values are gguf's own."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from pagewire.model.llama import LlamaForCausalLM, ModelSpec
    from pagewire.model.quantization.gguf import (
        _quantized_projection,
        part_formats,
        prepare_projections,
    )

    layer = "model.layers.0."
    kinds = {layer + "self_attn.q_proj": "Q4_K", layer + "self_attn.k_proj": "Q4_K",
             layer + "self_attn.v_proj": "Q6_K", layer + "self_attn.o_proj": "Q4_K",
             layer + "mlp.gate_proj": "Q4_K", layer + "mlp.up_proj": "Q4_K",
             layer + "mlp.down_proj": "Q6_K"}
    formats = part_formats(kinds)
    assert formats[layer + "self_attn.q_proj"] == formats[layer + "self_attn.v_proj"] == (8, 16)
    assert formats[layer + "mlp.gate_proj"] == (4, 32)
    spec = ModelSpec.from_hf_config(LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))
    model = LlamaForCausalLM(spec)
    prepare_projections(model, kinds, exact_f16=False)
    qkv = model.layers[0].self_attn.qkv_proj
    assert (qkv.bits, qkv.group_size) == (8, 16)
    assert (model.layers[0].mlp.gate_up_proj.bits, model.layers[0].mlp.down_proj.bits) == (4, 8)

    raw = _blocks("Q4_K", 8, 256, seed=5)
    packed = WeightOnlyLinear(256, 8, 8, 16, torch.float32)
    for key, value in _quantized_projection(SimpleNamespace(data=raw), "Q4_K", None,
                                            (8, 16)).items():
        getattr(packed, key).copy_(value)
    want = dequantize(raw, GGMLQuantizationType.Q4_K).reshape(8, 256)
    np.testing.assert_allclose(packed.reference_weight().numpy(), want, rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())


def test_a_pipeline_stage_takes_its_layers_types_by_the_files_numbering():
    """Stage 2 of a model holds the file's layers 2 and 3 as its 0 and 1: a layer's GGUF types
    (llama.cpp's mixes vary them by layer) are looked up under the file's number."""
    from transformers import LlamaConfig

    from pagewire.model.llama import LlamaForCausalLM, ModelSpec
    from pagewire.model.quantization.gguf import prepare_projections

    spec = ModelSpec.from_hf_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256))
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    kinds = {f"model.layers.{i}.{part}": "Q4_1" for i in range(4) for part in parts}
    kinds["model.layers.3.mlp.down_proj"] = "Q6_K"
    model = LlamaForCausalLM(spec)
    prepare_projections(model, kinds, exact_f16=False, first_layer=2)
    downs = [model.layers[i].mlp.down_proj for i in range(2)]
    assert [(d.bits, d.group_size) for d in downs] == [(4, 32), (8, 16)]
