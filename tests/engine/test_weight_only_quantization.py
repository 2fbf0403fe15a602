"""Weight-only checkpoints (GPTQ, AWQ, compressed-tensors' pack-quantized W4A16/W8A16) loaded in
their own packed layouts: a tiny Llama is quantized here by each format's rules (round to
nearest by group; act-order's scattered groups; AutoGPTQ's "zero - 1"; AWQ's interleaved
nibbles) and written in the format's exact packing by writers that follow the formats' own
packing code (not pagewire's), next to the float32 weights the integers stand for. The engine
on the packed checkpoint must give what it gives on those float32 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from pagewire import LLM, SamplingParams
from pagewire.model.quantization.weight_only import WeightOnlyLinear, pack_rows, unpack_rows

GROUP = 32


# --- the formats' packings, written as their own tools write them ------------------------------

def _pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Unsigned values packed into int32 along `dim`, 32/bits per word, value i of a word in
    bits [bits*i, bits*(i+1)); `order[i]` names which of the word's values goes in slot i."""
    per_word = 32 // bits
    v = values.numpy().astype(np.uint32)
    v = v if dim == 1 else v.T
    packed = np.zeros((v.shape[0], v.shape[1] // per_word), dtype=np.uint32)
    for slot in range(per_word):
        source = slot if order is None else order[slot]
        packed |= v[:, source::per_word] << (bits * slot)
    packed = packed if dim == 1 else packed.T
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32))


def _quantize(w: torch.Tensor, bits: int, group_of: torch.Tensor, groups: int, symmetric: bool):
    """Round to nearest by group, w [N, K] -> (q [N, K] unsigned, zeros [N, G], scales [N, G]
    rounded to float16 as the checkpoints store them)."""
    top = (1 << bits) - 1
    scales, zeros = torch.empty(w.shape[0], groups), torch.empty(w.shape[0], groups)
    for g in range(groups):
        cols = w[:, group_of == g]
        if symmetric:
            scales[:, g] = cols.abs().amax(dim=1) / (top / 2)
            zeros[:, g] = (top + 1) // 2
        else:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            scales[:, g] = (hi - lo) / top
            zeros[:, g] = (-lo / scales[:, g]).round().clamp(0, top)
    scales = scales.half().float()
    q = (w / scales[:, group_of] + zeros[:, group_of]).round().clamp(0, top)
    return q.long(), zeros.long(), scales


def _act_order_groups(k: int, seed: int) -> torch.Tensor:
    """GPTQ's desc_act: the quantizer walks the input rows in a permuted order and cuts groups
    along that walk, so g_idx[perm[i]] = i // group."""
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[perm] = torch.arange(k) // GROUP
    return g_idx


def _write_projection(fmt: str, bits: int, w: torch.Tensor, act_order: bool, symmetric: bool,
                      seed: int) -> tuple[dict, torch.Tensor]:
    """One projection's tensors in `fmt`, and the float32 weight [N, K] they stand for."""
    n, k = w.shape
    groups = k // GROUP
    group_of = _act_order_groups(k, seed) if act_order else torch.arange(k) // GROUP
    q, zeros, scales = _quantize(w, bits, group_of, groups, symmetric)
    reference = (q - zeros[:, group_of]).float() * scales[:, group_of]
    if fmt == "gptq":  # AutoGPTQ v1: zero - 1, kept to its low bits
        stored_zeros = (zeros - 1) & ((1 << bits) - 1)
        tensors = {"qweight": _pack(q.t(), bits, dim=0),
                   "qzeros": _pack(stored_zeros.t(), bits, dim=1),
                   "scales": scales.t().half().contiguous(),
                   "g_idx": group_of.int()}
    elif fmt == "awq":
        order = (0, 2, 4, 6, 1, 3, 5, 7)
        tensors = {"qweight": _pack(q.t(), 4, dim=1, order=order),
                   "qzeros": _pack(zeros.t(), 4, dim=1, order=order),
                   "scales": scales.t().half().contiguous()}
    else:  # compressed-tensors pack-quantized
        tensors = {"weight_packed": _pack(q, bits, dim=1),
                   "weight_scale": scales.half().contiguous(),
                   "weight_shape": torch.tensor([n, k])}
        if not symmetric:
            tensors["weight_zero_point"] = _pack(zeros, bits, dim=0)
        if act_order:
            tensors["weight_g_idx"] = group_of.int()
    return tensors, reference


def _config(fmt: str, bits: int, act_order: bool, symmetric: bool) -> dict:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": act_order,
                "sym": symmetric, "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                "zero_point": True}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": GROUP, "dynamic": False,
               "actorder": "group" if act_order else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None}},
            "ignore": ["lm_head"]}


def write_pair(folder, fmt: str, bits: int = 4, act_order: bool = False, symmetric: bool = True,
               shared_g_idx: bool = True) -> tuple[str, str]:
    """A small Llama saved in `fmt` and as the float32 weights its integers stand for. q/k/v
    (and gate/up) share one act-order as GPTQ gives them (one input, so one Hessian), unless
    shared_g_idx is False."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=False)
    state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    stored, reference = {}, {}
    for name, tensor in state.items():
        if "layers." in name and name.endswith("proj.weight"):
            prefix = name.removesuffix(".weight")
            layer = int(name.split("layers.")[1].split(".")[0])
            projection = name.split(".")[-2]
            inputs = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 1, "up_proj": 1}
            seed = 10 * layer + (inputs[projection] if shared_g_idx and projection in inputs
                                 else 5 + len(projection))
            parts, reference[name] = _write_projection(fmt, bits, tensor, act_order, symmetric,
                                                       seed)
            stored.update({f"{prefix}.{part}": value for part, value in parts.items()})
        else:
            stored[name] = reference[name] = tensor.contiguous()
    quantized, dense = folder / fmt, folder / "dense"
    config.save_pretrained(dense)
    save_file(reference, dense / "model.safetensors")
    config.quantization_config = _config(fmt, bits, act_order, symmetric)
    config.save_pretrained(quantized)
    save_file(stored, quantized / "model.safetensors")
    return str(quantized), str(dense)


# --- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_and_matches_the_formats_packing(bits):
    q = torch.randint(0, 1 << bits, (64, 24))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(packed, _pack(q, bits, dim=0))  # GPTQ's qweight layout, exactly
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
    llama.quantization_config = _config("compressed-tensors", 4, False, True)
    llama.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", kv_cache_memory_bytes=8 << 20,
              show_progress=False)
    layer = llm.engine.runner.model.layers[1].mlp.down_proj
    assert isinstance(layer, WeightOnlyLinear)
    assert layer.reference_weight().std() == pytest.approx(0.02, rel=0.1)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4

