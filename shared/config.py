"""Engine configuration: one frozen dataclass per concern, validated at construction.

Facts computed at start (the number of KV blocks, the resolved model directory) live in runtime
objects, never written back here.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from pagewire.model.quantization import check_method as check_quantization
from pagewire.spec_decode.config import SpeculativeConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

KERNELS = ("auto", "torch")
USAGES = ("offline", "server")
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' means float32 on CPU (no fast bf16 here) and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def is_large_gpu(device: str) -> bool:
    """A GPU of 70 GiB or more that is not an A100 (H100, H200, MI300X): vLLM's test for its
    bigger step defaults (on an A100 a bigger token budget measured slower)."""
    if not device.startswith("cuda"):
        return False
    props = torch.cuda.get_device_properties(torch.device(device))
    return props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start. Built once (from LLM() kwargs or CLI flags)."""

    model: str | None = None
    """A Hugging Face model directory, a .gguf file, or None for the embedded SmolLM2-135M."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to the model's own."""
    load_format: str = "auto"
    """auto | safetensors | gguf | dummy (random weights for the model's config)."""
    dtype: str = "auto"
    device: str = field(default_factory=default_device)
    seed: int = 0
    """Seeds dummy weights and the sampler's shared generator."""
    block_size: int = 16
    """Tokens per KV block. The router hashes prompts with the same block size."""
    kv_cache_memory_bytes: int | None = None
    """KV cache budget. None: 1 GiB on CPU; on CUDA, gpu_memory_utilization of the device."""
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    """Context limit (prompt + output); defaults to the model's max_position_embeddings."""
    max_num_seqs: int | None = None
    """Most sequences in one step; None: `seq_limit`."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (prefill chunks + decode tokens); None: `token_budget`."""
    usage: str = "server"
    """offline (the LLM class) | server (workers): picks the step defaults, as vLLM does."""
    kv_cache_dtype: str = "auto"
    """auto: the model's dtype | fp8 (fp8_e4m3): half the bytes per token, so twice the
    context in the same memory and half the bytes read per decode step, at 3 mantissa bits.
    Values are stored unscaled and saturate at +-448 (vLLM's default without calibrated
    scales)."""
    enable_prefix_caching: bool = True
    show_progress: bool = True
    kernels: str = "auto"
    """auto: Triton kernels on CUDA, torch on CPU | torch: torch everywhere (a reference)."""
    enforce_eager: bool = False
    """Never replay CUDA graphs (they serve decode steps on the Triton path)."""
    async_scheduling: bool | None = None
    """Schedule and launch step N+1 before reading step N's tokens back, so the host's work
    overlaps the device's. None: on CUDA with one rank (on CPU the host is the device; under
    parallelism it waits for a multi-GPU measurement). Under tensor parallelism rank 0 sends
    the tokens step N sampled to the other ranks on the device; under pipeline parallelism True
    means micro-batches: a step per stage in the pipeline at once."""
    kv_cache_shared_dir: str | None = None
    """CPU only: keep the KV cache in a file of this tmpfs folder (mapped shared), so a prefill
    worker on the same host can write a prompt's KV straight into it (the shm KV transport).
    A folder without room for it leaves the cache in private memory."""
    quantization: str | None = None
    """vLLM's names. fp8: weights quantized at load (per-channel weight scales, per-token
    activation scales; fp8 GEMMs on Ada/Hopper GPUs). A checkpoint's own quantization_config
    (compressed-tensors W8A8 or W4A16/W8A16, GPTQ, AWQ) is detected and loaded in its packed
    layout without it. None: the model's dtype."""
    tensor_parallel_size: int = 1
    """Ranks (processes; one GPU each on CUDA) that each hold a slice of every layer
    (parallel/). Above 1, steps run without CUDA graphs (speculation's drafts are proposed and
    verified on rank 0)."""
    pipeline_parallel_size: int = 1
    """Stages of consecutive layers (parallel/pipeline.py), each of tensor_parallel_size
    ranks; one step in flight at a time unless async_scheduling=True (micro-batches)."""
    speculative_config: SpeculativeConfig | dict | str | None = None
    """Speculative decoding, vLLM's dict (or its JSON): {"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}. Kept as a
    SpeculativeConfig once validated."""

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        parse_dtype(self.dtype, self.device)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be > 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.usage not in USAGES:
            raise ValueError(f"usage must be one of {USAGES}, got {self.usage!r}")
        if self.quantization == "":
            object.__setattr__(self, "quantization", None)
        check_quantization(self.quantization)
        object.__setattr__(self, "speculative_config",
                           SpeculativeConfig.parse(self.speculative_config))
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError("pipeline_parallel_size must be >= 1, got "
                             f"{self.pipeline_parallel_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")

    @property
    def parallel_size(self) -> int:
        """Processes of one engine: tensor x pipeline ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def use_triton(self) -> bool:
        """Whether the model runs the Triton kernels (kernels/): on CUDA unless told not to."""
        return self.kernels == "auto" and self.device.startswith("cuda")

    @property
    def seq_limit(self) -> int:
        """max_num_seqs, or its default: 1024 on a large GPU (vLLM's), where more sequences
        per decode step spread each read of the weights over more tokens; 256 elsewhere."""
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        return 1024 if is_large_gpu(self.device) else 256

    @property
    def token_budget(self) -> int:
        """max_num_batched_tokens, or its default. On CUDA a step's fixed costs (weights read,
        launches) favour big prefill chunks (W1 on an H100: 5,956 tok/s at 8192 against 4,949
        at 2048): 8192, and for offline use on a large GPU 16384, as vLLM's LLM class does
        (W1: 9,284 tok/s with 512 sequences against 9,053 at 8192). A server keeps 8192: a
        bigger chunk lengthens the stall of the decodes beside it. 2048 on CPU, where a big
        chunk holds the decodes back."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if not self.device.startswith("cuda"):
            return 2048
        return 16384 if self.usage == "offline" and is_large_gpu(self.device) else 8192

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """The KV cache's element type."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or self.torch_dtype

    @property
    def use_cuda_graphs(self) -> bool:
        return self.use_triton and not self.enforce_eager and self.parallel_size == 1

    @property
    def use_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        # Not the pipeline's micro-batches: on CPU (stages sharing the cores) they measured
        # 0.79x one step at a time; they wait for a multi-GPU measurement (loadtests/RESULTS.md).
        return self.device.startswith("cuda") and self.parallel_size == 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.device)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)
