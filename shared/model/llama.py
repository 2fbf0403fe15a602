"""The Llama family in one flattened-batch implementation: Llama (incl. Llama 3 rope scaling),
SmolLM2, Mistral (full attention), Qwen2 (qkv bias) and Qwen3 (per-head q/k RMSNorm).

Differences between the families are flags read from the Hugging Face config (ModelSpec), not
subclasses. Every forward takes all tokens of a step flattened to [T] plus AttentionMetadata, so
prefill chunks and decode tokens run in the same call. q/k/v and gate/up are fused into one
matmul each; the loader (weights.py) packs Hugging Face's separate tensors into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagewire.model.attention import AttentionMetadata, TorchPagedAttention
from pagewire.model.layers import Linear, RMSNorm, RotaryEmbedding, silu_and_mul

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    """The facts of a Hugging Face config that the model code needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    """Mistral's window: full attention is exact only below it, so the context is capped."""

    @property
    def max_context(self) -> int:
        return min(self.max_position_embeddings,
                   self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        num_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        # transformers >= 5 keeps rope settings in rope_parameters; older ones in rope_theta/
        # rope_scaling.
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = getattr(config, "rope_scaling", None) or rope or None
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if scaling is not None and rope_type in (None, "default"):
            scaling = None
        elif scaling is not None and "rope_type" not in scaling:
            scaling = {**scaling, "rope_type": scaling.get("type")}
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "mistral") and attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=getattr(config, "sliding_window", None) if model_type == "mistral"
            else None,
        )


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, use_triton: bool, tp=None):
        """spec: this rank's (its heads only, under tensor parallelism); tp: the TPGroup whose
        ranks' o_proj outputs sum to the block's output."""
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, use_triton)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, use_triton)
        self.rotary = rotary
        backend = TorchPagedAttention
        if use_triton:  # imported only here: CPU installs have no triton
            from pagewire.kernels.attention_backend import TritonPagedAttention as backend
        self.attn = backend(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                            scale=spec.head_dim**-0.5)

    def forward(self, positions, hidden, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.o_proj(self.attn.forward(q, k, v, kv_cache, meta))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, use_triton: bool, tp=None):
        super().__init__()
        self.use_triton, self.tp = use_triton, tp
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        out = self.down_proj(silu_and_mul(self.gate_up_proj(x), self.use_triton))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, use_triton: bool, tp=None):
        super().__init__()
        self.self_attn = Attention(spec, rotary, use_triton, tp)
        self.mlp = MLP(spec, use_triton, tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, use_triton)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, use_triton)

    def forward(self, positions, hidden, residual, kv_cache, meta):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def vocab_parallel_lookup(ids: torch.Tensor, vocab_start: int, num_rows: int, tp,
                          lookup) -> torch.Tensor:
    """A rank's part of an embedding lookup, rows [vocab_start, vocab_start + num_rows) held
    here: `lookup` of local row ids, tokens outside them zeros, summed over the ranks."""
    local = ids - vocab_start
    inside = (local >= 0) & (local < num_rows)
    out = lookup(local.clamp(0, num_rows - 1))
    return tp.all_reduce(out * inside.unsqueeze(-1).to(out.dtype))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding: tokens outside them look up zeros, and the ranks'
    lookups sum to the full one."""

    def __init__(self, vocab_start: int, vocab_size: int, hidden_size: int, tp):
        super().__init__(vocab_size, hidden_size)
        self.vocab_start, self.tp = vocab_start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_lookup(ids, self.vocab_start, self.num_embeddings, self.tp,
                                     super().forward)


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, use_triton: bool = False, shard=None, tp=None):
        """use_triton: the Triton kernels (kernels/) for attention and the small ops; CUDA only.
        Under tensor parallelism, spec is this rank's local spec, shard its RankShard
        (parallel/partition.py) and tp the TPGroup."""
        super().__init__()
        self.spec, self.tp = spec, tp
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta,
                                 spec.rope_scaling, use_triton)
        vocab = spec.vocab_size if shard is None else shard.vocab.size
        if tp is None:
            self.embed_tokens = nn.Embedding(vocab, spec.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(shard.vocab.start, vocab,
                                                       spec.hidden_size, tp)
            self.vocab_sizes = list(shard.vocab_sizes)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary, use_triton, tp)
                                    for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, use_triton)
        self.lm_head = Linear(spec.hidden_size, vocab, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]; compute_logits picks rows to project."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.tp is not None:  # each rank scored its slice of the vocabulary
            logits = self.tp.gather_columns(logits, self.vocab_sizes)
        return logits

    def pack_for_cpu(self) -> None:
        """Prepacks every projection for oneDNN (after the weights are loaded)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_cpu()
