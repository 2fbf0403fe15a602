"""Weights into the model: Hugging Face safetensors directories, GGUF files (converted once
into a cached safetensors directory, see model_source.py), or random "dummy" weights.

Hugging Face keeps q/k/v and gate/up as separate tensors; the model fuses them, so each
checkpoint name maps to (parameter, shard index) through PACKED.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from pagewire.parallel.partition import Slice

# checkpoint sub-name -> (fused parameter sub-name, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _shard_sizes(model: nn.Module, fused: str) -> list[int]:
    spec = model.spec
    if fused == "qkv_proj":
        kv = spec.num_kv_heads * spec.head_dim
        return [spec.num_heads * spec.head_dim, kv, kv]
    return [spec.intermediate_size, spec.intermediate_size]


# Buffers a quantized layer keeps (quantization/): the weight loader writes them like
# parameters. Along which dim a fused layer's shards (q/k/v, gate/up) lie: 0 for [out, ...]
# tensors, 1 for weight-only layouts ([..., out]); None for a tensor every shard shares.
BUFFER_SHARD_DIMS = {"weight": 0, "weight_scale": 0, "qweight": 1, "scales": 1, "offsets": 1,
                     "perm": None}
SHARD_DIMS = {**BUFFER_SHARD_DIMS, "bias": 0}


def rank_slice(name: str, tensor: torch.Tensor, shard, head_dim: int) -> torch.Tensor:
    """A tensor-parallel rank's part of a checkpoint tensor (parallel/partition.py's RankShard):
    its heads, intermediate width or vocabulary along the output of column-parallel layers, and
    along the input of row-parallel ones (o_proj, down_proj; their bias on rank 0 only, as the
    ranks' outputs are summed); the whole of anything else.

    Quantized layers' tensors (BUFFER_SHARD_DIMS): weight-only ones ([K/pack or K/group, N])
    hold the output along dim 1 and the input, packed or grouped, along dim 0, so a row-parallel
    cut must fall on whole words and whole groups; one scale per output row (W8A8) follows the
    rows, a per-tensor scale and one group spanning the whole input stay whole."""
    parts = name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
    heads = {"q_proj": shard.q_heads, "k_proj": shard.kv_heads, "v_proj": shard.kv_heads}
    if module in heads or module in ("gate_proj", "up_proj"):
        if kind == "perm":  # over the input, which column-parallel layers do not split
            return tensor
        cut = heads[module] if module in heads else shard.intermediate
        step = head_dim if module in heads else 1
        dim = 1 if kind in ("qweight", "scales", "offsets") else 0
        if kind == "weight_scale" and tensor.numel() == 1:
            return tensor
        return tensor.narrow(dim, cut.start * step, cut.size * step)
    if module in ("embed_tokens", "lm_head") or name.startswith("embed_tokens.layer."):
        # A packed (GGUF) embedding or head is hidden -> vocab: its vocabulary is dim 1.
        dim = 1 if kind in ("qweight", "scales", "offsets") else 0
        return tensor.narrow(dim, shard.vocab.start, shard.vocab.size)
    if module in ("o_proj", "down_proj"):
        if kind in ("bias", "weight_scale"):  # per output row: every rank's sum needs it once
            return tensor if kind == "weight_scale" or shard.rank == 0 else \
                torch.zeros_like(tensor)
        if module == "down_proj":
            cut, total = shard.intermediate, shard.total_intermediate
        else:
            cut = Slice(shard.q_heads.start * head_dim, shard.q_heads.size * head_dim)
            total = shard.total_q_heads * head_dim
        if kind == "perm":
            raise ValueError(f"{name}: act-order (GPTQ desc_act) rows cannot be split across "
                             "tensor-parallel ranks; use a checkpoint without act-order")
        if kind == "weight":
            return tensor.narrow(1, cut.start, cut.size)
        if kind in ("scales", "offsets") and tensor.shape[0] == 1:
            return tensor  # one group over the whole input: each rank's slice is its group
        rows_per_input = tensor.shape[0] / total  # packed words or groups per input column
        start, size = cut.start * rows_per_input, cut.size * rows_per_input
        if start != int(start) or size != int(size):
            raise ValueError(f"{name}: rank {shard.rank}'s inputs [{cut.start}, {cut.stop}) of "
                             f"{total} do not fall on whole {kind} rows ({tensor.shape[0]})")
        return tensor.narrow(0, int(start), int(size))
    return tensor


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 shard=None, stage=None) -> None:
    """Copies checkpoint tensors into the model; every parameter must be written exactly once.
    shard: a tensor-parallel rank's RankShard; each tensor is cut to its part first. stage: a
    pipeline stage's PipelineStage; only its tensors are read (parallel/pipeline.py)."""
    params = {name: buffer for name, buffer in model.named_buffers()
              if name.rsplit(".", 1)[-1] in BUFFER_SHARD_DIMS}
    params.update(model.named_parameters(remove_duplicate=False))
    written: set[str] = set()
    for ckpt_name, tensor in weights:
        name = ckpt_name.removeprefix("model.")
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and model.spec.tie_word_embeddings:
            continue
        if stage is not None:
            from pagewire.parallel.pipeline import stage_name

            name = stage_name(name, stage, model.spec.tie_word_embeddings)
            if name is None:
                continue
        if shard is not None:
            tensor = rank_slice(name, tensor, shard, model.spec.head_dim)
        fused_shard = None
        for sub, (fused, index) in PACKED.items():
            if f".{sub}." in name:
                name, fused_shard = name.replace(f".{sub}.", f".{fused}."), index
                break
        if name not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
        param = params[name]
        kind = name.rsplit(".", 1)[-1]
        if kind == "weight_scale":
            # A W8A8 checkpoint's scales: per channel [out, 1] or per tensor [1] / []; the
            # layer keeps one per output row (a fused layer's shards each had their own).
            tensor = tensor.float().reshape(-1)
            if tensor.numel() == 1:
                tensor = tensor.expand(param.shape[0] if fused_shard is None else
                                       _shard_sizes(model, name.split(".")[-2])[fused_shard])
        if fused_shard is None:
            target = param
        elif SHARD_DIMS.get(kind, 0) is None:
            # Shared by the shards (act-order's permutation): they must agree.
            target = param
            first = not any(f"{name}#{i}" in written for i in range(3))
            if not first and not torch.equal(param, tensor.to(param.device, param.dtype)):
                raise ValueError(f"{ckpt_name}: differs from the other projections fused with "
                                 "it, which pagewire cannot load fused")
            name = f"{name}#{fused_shard}"
        else:
            sizes = _shard_sizes(model, name.split(".")[-2])
            target = param.narrow(SHARD_DIMS.get(kind, 0), sum(sizes[:fused_shard]),
                                  sizes[fused_shard])
            name = f"{name}#{fused_shard}"
        if target.shape != tensor.shape:
            raise ValueError(f"{ckpt_name}: shape {tuple(tensor.shape)} does not match the "
                             f"model's {tuple(target.shape)}")
        target.copy_(tensor.to(target.dtype))
        written.add(name)
    _check_all_written(model, params, written)


def _check_all_written(model, params, written):
    missing = []
    for name in params:
        if name == "lm_head.weight" and model.spec.tie_word_embeddings:
            continue
        fused = name.split(".")[-2] if name.rsplit(".", 1)[-1] in SHARD_DIMS else ""
        if fused in ("qkv_proj", "gate_up_proj"):
            shards = 3 if fused == "qkv_proj" else 2
            missing += [f"{name}#{i}" for i in range(shards) if f"{name}#{i}" not in written]
        elif name not in written:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights with realistic scales (std 0.02, norms near 1), reproducible by seed.

    Used for benchmarks of real model shapes without real checkpoints; outputs are noise.
    """
    # Drawn on the parameter's device: an 8B model's worth of numbers is slow on a CPU.
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.uniform_(0.9, 1.1, generator=gen)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():  # quantized layers keep their weights as buffers
        if hasattr(module, "init_dummy"):
            module.init_dummy(gen)
