"""Quantized linear layers: one small family behind one interface, so model files never change
per method. Every projection of the decoder (`Linear`: qkv, o, gate_up, down) becomes its
method's layer, which holds the weight in the method's format and computes `x @ W.T (+ bias)`
from it. Embeddings, norms and the LM head stay in the model's dtype (vLLM's default too: they
are a small share of the weights and the most sensitive).

Methods (vLLM's names):
- `fp8`: a bf16/fp16/fp32 checkpoint quantized at load (`quantize_model` after the weights
  load);
- `compressed-tensors`, detected from the checkpoint's `quantization_config`: its W8A8 schemes
  (float8 or int8 weights with per-channel or per-tensor scales, activations quantized per
  token at run time), loaded as stored (`prepare_for_checkpoint` before the weights load). Its
  W4A16, GPTQ and AWQ are refused at start by name: no loader yet.
"""

from __future__ import annotations

from torch import nn

from pagewire.model.layers import Linear

METHODS = ("fp8", "compressed-tensors")
CHECKPOINT_METHODS = ("compressed-tensors",)  # named by a checkpoint, not chosen at load


def check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS} (or None), got {method!r}")


def checkpoint_method(hf_config, requested: str | None) -> str | None:
    """The method to run: the checkpoint's own if its config has a quantization_config (checked
    against `requested`), else `requested`. A checkpoint this engine cannot load is refused
    here, at start, with its method's name, rather than loaded as garbage."""
    config = getattr(hf_config, "quantization_config", None)
    if not config:
        if requested in CHECKPOINT_METHODS:
            raise ValueError(f"quantization={requested!r} needs a checkpoint quantized that way; "
                             "this one has no quantization_config")
        return requested
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method")
    method = str(getattr(method, "value", method))
    if method != "compressed-tensors" or _w8a8_type(config) is None:
        raise ValueError(f"the checkpoint is pre-quantized ({method!r}, {_scheme(config)}), "
                         "which pagewire cannot load yet: it loads compressed-tensors' W8A8 "
                         "(FP8 or INT8 weights, dynamic per-token activations), and quantizes "
                         "full-precision checkpoints at load (quantization='fp8')")
    if requested not in (None, method):
        raise ValueError(f"the checkpoint is quantized with {method!r}; quantization="
                         f"{requested!r} cannot apply to it")
    return method


def _scheme(config: dict) -> str:
    groups = config.get("config_groups") or {}
    if not groups:
        return f"{config.get('bits', '?')}-bit"
    weights = next(iter(groups.values())).get("weights") or {}
    return f"{weights.get('type', '?')}{weights.get('num_bits', '?')} weights"


def _w8a8_type(config: dict) -> str | None:
    """"float" or "int" for compressed-tensors' W8A8 family (FP8_DYNAMIC, W8A8 INT8): one group
    on the Linear layers, 8-bit symmetric weights by channel or tensor, 8-bit activations of the
    same type per token, dynamic. None for anything else."""
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1 or config.get("format") not in ("float-quantized", "int-quantized",
                                                         "naive-quantized"):
        return None
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    kind = weights.get("type")
    if (kind in ("float", "int") and weights.get("num_bits") == 8
            and weights.get("strategy") in ("channel", "tensor")
            and weights.get("symmetric", True) and not weights.get("dynamic", False)
            and inputs.get("type") == kind and inputs.get("num_bits") == 8
            and inputs.get("strategy") == "token" and inputs.get("dynamic") is True
            and inputs.get("symmetric", True)):
        return kind
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
    """`compressed-tensors`: empty layers of the checkpoint's scheme (fp8 or int8) in place of
    the projections, which the weight loader then fills with its weights and scales."""
    from pagewire.model.quantization.fp8 import Fp8Linear
    from pagewire.model.quantization.int8 import Int8Linear

    config = hf_config.quantization_config
    config = config if isinstance(config, dict) else config.to_dict()
    layer_type = {"float": Fp8Linear, "int": Int8Linear}[_w8a8_type(config)]
    for parent, name, child in _projections(model):
        setattr(parent, name, layer_type.empty_like(child))
