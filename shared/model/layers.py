"""Small model layers in plain torch: RMSNorm (with fused residual add), rotary embedding,
SiLU-and-multiply. Their numerics follow Hugging Face's Llama code exactly (float32 inside
the norm, cos/sin computed in float32) so greedy tokens match transformers bit for bit on CPU.
Triton versions (kernels/) replace these on CUDA behind the same call signatures.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear that, on CPU, runs small batches through a oneDNN-prepacked copy of its
    weight. Decode steps multiply a few dozen rows by weights that are cold in cache; there the
    packed layout measured ~20% faster than MKL's sgemm on our machines, while prefill-sized
    batches are as fast or faster dense (loadtests/RESULTS.md). CUDA never packs."""

    PACKED_MAX_ROWS = 128

    def pack_for_cpu(self) -> None:
        self._packed_weight = self.weight.detach().to_mkldnn()
        self._packed_bias = None if self.bias is None else self.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = getattr(self, "_packed_weight", None)
        if packed is None or x.dim() != 2 or x.shape[0] > self.PACKED_MAX_ROWS:
            return super().forward(x)
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), packed,
                                          self._packed_bias).to_dense()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, use_triton: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_triton = use_triton

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if self.use_triton:
            from pagewire.kernels.rms_norm import rms_norm
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def silu_and_mul(gate_up: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    if use_triton:
        from pagewire.kernels.silu_and_mul import silu_and_mul as triton_silu_and_mul
        return triton_silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent rope scaling (long wavelengths stretched by `factor`)."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding over a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None,
                 use_triton: bool = False):
        super().__init__()
        self.use_triton = use_triton
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta**exponents)
        rope_type = (scaling or {}).get("rope_type", "default")
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type not in ("default", None):
            raise NotImplementedError(f"rope scaling {rope_type!r} is not supported yet")
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim], positions: [T]."""
        if self.use_triton:
            from pagewire.kernels.rotary_embedding import rotary_embedding
            return rotary_embedding(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
