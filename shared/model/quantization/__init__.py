"""Quantized linear layers: one small family behind one interface, so model files never change
per method. Every projection of the decoder (`Linear`: qkv, o, gate_up, down) becomes its
method's layer, which holds the weight in the method's format and computes `x @ W.T (+ bias)`
from it. Embeddings, norms and the LM head stay in the model's dtype (vLLM's default too: they
are a small share of the weights and the most sensitive).

Methods (vLLM's names):
- `fp8`: a bf16/fp16/fp32 checkpoint quantized at load (`quantize_model` after the weights
  load): Fp8Linear;
- read from a checkpoint's `quantization_config` (`prepare_for_checkpoint` swaps in empty
  layers of its scheme before the weights load; `checkpoint_tensors` converts its tensors as
  they stream):
  - `compressed-tensors`: W8A8 (Fp8Linear, Int8Linear, stored as held) and pack-quantized
    W4A16/W8A16 (WeightOnlyLinear);
  - `gptq` (4/8 bits, group size, act-order) and `awq` (4 bits, GEMM layout): WeightOnlyLinear;
- `gguf`: a .gguf model's projections read from its blocks, held packed (gguf.py).
Anything else pre-quantized is refused at start by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagewire.model.layers import Linear

METHODS = ("fp8", "compressed-tensors", "gptq", "awq", "gguf")
CHECKPOINT_METHODS = ("compressed-tensors", "gptq", "awq")  # named by a checkpoint


def check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS} (or None), got {method!r}")


def _config_dict(hf_config) -> dict | None:
    config = getattr(hf_config, "quantization_config", None)
    if not config:
        return None
    return config if isinstance(config, dict) else config.to_dict()


def _method_name(config: dict) -> str:
    method = config.get("quant_method")
    return str(getattr(method, "value", method)).lower()


def checkpoint_method(hf_config, requested: str | None) -> str | None:
    """The method to run: the checkpoint's own if its config has a quantization_config (checked
    against `requested`), else `requested`. A checkpoint this engine cannot load is refused
    here, at start, with its method's name, rather than loaded as garbage."""
    config = _config_dict(hf_config)
    if config is None:
        if requested in CHECKPOINT_METHODS:
            raise ValueError(f"quantization={requested!r} needs a checkpoint quantized that way; "
                             "this one has no quantization_config")
        return requested
    method = _method_name(config)
    if method not in CHECKPOINT_METHODS or (
            method == "compressed-tensors" and _compressed_tensors_kind(config) is None):
        raise ValueError(f"the checkpoint is pre-quantized ({method!r}, {_scheme(config)}), "
                         "which pagewire cannot load: it loads compressed-tensors' W8A8 (FP8 or "
                         "INT8) and pack-quantized W4A16/W8A16, GPTQ (4/8-bit) and AWQ (4-bit "
                         "GEMM), and quantizes full-precision checkpoints at load "
                         "(quantization='fp8')")
    if requested not in (None, method):
        raise ValueError(f"the checkpoint is quantized with {method!r}; quantization="
                         f"{requested!r} cannot apply to it")
    packed_format(config)  # refuses unsupported variants (AWQ GEMV, 3-bit GPTQ) at start
    return method


def _scheme(config: dict) -> str:
    groups = config.get("config_groups") or {}
    if not groups:
        return f"{config.get('bits', '?')}-bit"
    weights = next(iter(groups.values())).get("weights") or {}
    return f"{weights.get('type', '?')}{weights.get('num_bits', '?')} weights"


def _compressed_tensors_kind(config: dict) -> str | None:
    """"float" / "int" (W8A8), "packed" (WnA16), or None (a scheme not loaded here)."""
    from pagewire.model.quantization.compressed_tensors import pack_quantized_format, w8a8_type

    return w8a8_type(config) or ("packed" if pack_quantized_format(config) else None)


def packed_format(config: dict | None):
    """The checkpoint's packed weight-only format (GPTQ, AWQ, pack-quantized), or None."""
    if config is None:
        return None
    method = _method_name(config)
    if method == "gptq":
        from pagewire.model.quantization.gptq import GptqFormat
        return GptqFormat(config)
    if method == "awq":
        from pagewire.model.quantization.awq import AwqFormat
        return AwqFormat(config)
    if method == "compressed-tensors":
        from pagewire.model.quantization.compressed_tensors import pack_quantized_format
        return pack_quantized_format(config)
    return None


def _projections(model: nn.Module):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Linear and name != "lm_head":
                yield parent, name, child


def quantize_model(model: nn.Module, method: str) -> None:
    """`fp8`: replaces each decoder projection, loaded in full precision, in place."""
    from pagewire.model.quantization.fp8 import Fp8Linear

    assert method == "fp8", method
    for parent, name, child in _projections(model):
        setattr(parent, name, Fp8Linear.from_linear(child))


def prepare_for_checkpoint(model: nn.Module, hf_config) -> None:
    """Empty layers of the checkpoint's scheme in place of the projections, which the weight
    loader then fills with its tensors (converted by `checkpoint_tensors`)."""
    from pagewire.model.quantization.fp8 import Fp8Linear
    from pagewire.model.quantization.int8 import Int8Linear
    from pagewire.model.quantization.weight_only import WeightOnlyLinear

    config = _config_dict(hf_config)
    fmt = packed_format(config)
    if fmt is None:
        layer_type = {"float": Fp8Linear, "int": Int8Linear}[_compressed_tensors_kind(config)]
        make = layer_type.empty_like
    else:
        scheme = fmt.scheme

        def make(linear):
            group = linear.in_features if scheme.group_size == -1 else scheme.group_size
            return WeightOnlyLinear.empty_like(linear, scheme.bits, group, scheme.act_order)
    for parent, name, child in _projections(model):
        setattr(parent, name, make(child))


def checkpoint_tensors(weights: Iterable[tuple[str, torch.Tensor]], hf_config
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with a packed format's projections converted to
    WeightOnlyLinear's layout; others as stored."""
    fmt = packed_format(_config_dict(hf_config))
    if fmt is None:
        return iter(weights)
    from pagewire.model.quantization.packed_checkpoint import regroup

    return regroup(weights, fmt)
