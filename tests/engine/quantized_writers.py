"""Writers of quantized checkpoints in each format's exact packing (GPTQ, AWQ,
compressed-tensors pack-quantized and W8A8), following the formats' own packing code rather
than pagewire's, from any float32 state dict: round to nearest by group (act-order's scattered
groups, AutoGPTQ's "zero - 1", AWQ's interleaved nibbles). Used by the loader tests on tiny
random models and by loadtests/quantization_accuracy.py on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# --- the formats' packings, written as their own tools write them ------------------------------

def pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
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


def _act_order_groups(k: int, group: int, seed: int) -> torch.Tensor:
    """GPTQ's desc_act: the quantizer walks the input rows in a permuted order and cuts groups
    along that walk, so g_idx[perm[i]] = i // group."""
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[perm] = torch.arange(k) // group
    return g_idx


def _write_projection(fmt: str, bits: int, group: int, w: torch.Tensor, act_order: bool,
                      symmetric: bool, seed: int) -> tuple[dict, torch.Tensor]:
    """One projection's tensors in `fmt`, and the float32 weight [N, K] they stand for."""
    n, k = w.shape
    groups = k // group
    group_of = _act_order_groups(k, group, seed) if act_order else torch.arange(k) // group
    q, zeros, scales = _quantize(w, bits, group_of, groups, symmetric)
    reference = (q - zeros[:, group_of]).float() * scales[:, group_of]
    if fmt == "gptq":  # AutoGPTQ v1: zero - 1, kept to its low bits
        stored_zeros = (zeros - 1) & ((1 << bits) - 1)
        tensors = {"qweight": pack(q.t(), bits, dim=0),
                   "qzeros": pack(stored_zeros.t(), bits, dim=1),
                   "scales": scales.t().half().contiguous(),
                   "g_idx": group_of.int()}
    elif fmt == "awq":
        order = (0, 2, 4, 6, 1, 3, 5, 7)
        tensors = {"qweight": pack(q.t(), 4, dim=1, order=order),
                   "qzeros": pack(zeros.t(), 4, dim=1, order=order),
                   "scales": scales.t().half().contiguous()}
    else:  # compressed-tensors pack-quantized
        tensors = {"weight_packed": pack(q, bits, dim=1),
                   "weight_scale": scales.half().contiguous(),
                   "weight_shape": torch.tensor([n, k])}
        if not symmetric:
            tensors["weight_zero_point"] = pack(zeros, bits, dim=0)
        if act_order:
            tensors["weight_g_idx"] = group_of.int()
    return tensors, reference


def quantization_config(fmt: str, bits: int, group: int, act_order: bool, symmetric: bool
                        ) -> dict:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                "sym": symmetric, "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                "zero_point": True}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": group, "dynamic": False,
               "actorder": "group" if act_order else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None}},
            "ignore": ["lm_head"]}

# Projections fed the same input share one act-order (one Hessian), as GPTQ gives them.
_SAME_INPUT = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 1, "up_proj": 1}


def write_quantized(folder, config: dict, state: dict[str, torch.Tensor], fmt: str,
                    bits: int = 4, group: int = 32, act_order: bool = False,
                    symmetric: bool = True, shared_g_idx: bool = True
                    ) -> dict[str, torch.Tensor]:
    """Saves `state` (a Llama's float32 tensors, Hugging Face names) quantized in `fmt` with
    `config` (a config.json dict) into folder; returns the float32 state its integers stand
    for."""
    stored, reference = {}, {}
    for name, tensor in state.items():
        if "layers." in name and name.endswith("proj.weight"):
            prefix = name.removesuffix(".weight")
            layer = int(name.split("layers.")[1].split(".")[0])
            projection = name.split(".")[-2]
            seed = 10 * layer + (_SAME_INPUT[projection]
                                 if shared_g_idx and projection in _SAME_INPUT
                                 else 5 + len(projection))
            parts, reference[name] = _write_projection(fmt, bits, group, tensor.float(),
                                                       act_order, symmetric, seed)
            stored.update({f"{prefix}.{part}": value for part, value in parts.items()})
        else:
            stored[name] = reference[name] = tensor.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "quantization_config":
              quantization_config(fmt, bits, group, act_order, symmetric)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(stored, str(folder / "model.safetensors"))
    return reference


def write_w8a8(folder, config: dict, state: dict[str, torch.Tensor], kind: str,
               strategy: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' W8A8 (kind "float": FP8, "int": INT8; strategy "channel" or
    "tensor"): the projections' weights and scales as stored; returns the float32 state."""
    stored, reference = {}, {}
    for name, tensor in state.items():
        if "layers." in name and name.endswith("proj.weight"):
            tensor = tensor.float()
            amax = tensor.abs().amax(dim=1, keepdim=True) if strategy == "channel" else \
                tensor.abs().amax().reshape(1)
            if kind == "float":
                scale = amax / 448
                values = (tensor / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            else:
                scale = amax / 127
                values = (tensor / scale).round().clamp(-128, 127).to(torch.int8)
            stored[name], stored[name + "_scale"] = values, scale.float()
            reference[name] = values.float() * scale
        else:
            stored[name] = reference[name] = tensor.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    group = {"targets": ["Linear"],
             "weights": {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True,
                         "dynamic": False},
             "input_activations": {"num_bits": 8, "type": kind, "strategy": "token",
                                   "symmetric": True, "dynamic": True}}
    config = {**config, "quantization_config": {
        "quant_method": "compressed-tensors", "format": f"{kind}-quantized",
        "config_groups": {"group_0": group}, "ignore": ["lm_head"]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(stored, str(folder / "model.safetensors"))
    return reference
