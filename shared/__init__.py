"""pagewire: an LLM inference and serving engine with a paged KV cache, continuous batching and
disaggregated prefill/decode services. The offline API mirrors vLLM's."""

from pagewire.llm import LLM
from pagewire.outputs import CompletionOutput, RequestOutput
from pagewire.sampling.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
