"""pagewire: an LLM inference and serving engine with a paged KV cache, continuous batching and
disaggregated prefill/decode services. The offline API mirrors vLLM's.

The names below load lazily: services that never run a model (router, gateway) import
`pagewire.*` without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pagewire.import_roots import drop_checkout_roots

# Before anything imports transformers: a checkout root on sys.path would shadow PyPI packages.
drop_checkout_roots()

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput"]

_LAZY = {
    "LLM": "pagewire.llm",
    "SamplingParams": "pagewire.sampling.params",
    "StructuredOutputsParams": "pagewire.sampling.structured",
    "RequestOutput": "pagewire.outputs",
    "CompletionOutput": "pagewire.outputs",
}

if TYPE_CHECKING:
    from pagewire.llm import LLM
    from pagewire.outputs import CompletionOutput, RequestOutput
    from pagewire.sampling.params import SamplingParams
    from pagewire.sampling.structured import StructuredOutputsParams


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagewire' has no attribute {name!r}")
