"""Quantized linear layers: one small family behind one interface, so model files never change
per method. After the weights load, `quantize_model` swaps every projection of the decoder
(`Linear`: qkv, o, gate_up, down) for its method's layer, which holds the weight in the
method's format and computes `x @ W.T (+ bias)` from it. Embeddings, norms and the LM head stay
in the model's dtype (vLLM's default too: they are a small share of the weights and the most
sensitive).

Methods (vLLM's names): `fp8` (fp8.py) quantizes a bf16/fp16/fp32 checkpoint at load.
"""

from __future__ import annotations

from torch import nn

from pagewire.model.layers import Linear

METHODS = ("fp8",)


def check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS} (or None), got {method!r}")


def refuse_prequantized(hf_config) -> None:
    """A checkpoint already quantized (its config has a quantization_config) is refused at
    start with its method's name, rather than loaded as garbage: its packed layouts (GPTQ, AWQ,
    compressed-tensors, fp8 with stored scales) have no loader yet."""
    config = getattr(hf_config, "quantization_config", None)
    if not config:
        return
    method = config.get("quant_method") if isinstance(config, dict) else \
        getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    raise ValueError(f"the checkpoint is pre-quantized ({method!r}), which pagewire cannot load "
                     "yet; it quantizes full-precision checkpoints at load (quantization="
                     f"{', '.join(repr(m) for m in METHODS)})")


def quantize_model(model: nn.Module, method: str) -> None:
    """Replaces each decoder projection with `method`'s layer, in place."""
    check_method(method)
    from pagewire.model.quantization.fp8 import Fp8Linear

    layer_type = {"fp8": Fp8Linear}[method]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Linear and name != "lm_head":
                setattr(parent, name, layer_type.from_linear(child))
