"""GGUF kept quantized (`quantization="gguf"`, vLLM's name): the decoder's projections are read
straight from the .gguf file's blocks into WeightOnlyLinear's packed layout, so the model holds
about the file's bytes instead of float32 copies (the default path, model_source.py, still
dequantizes once for exactness tests).

Each block format is one group of integers with a scale and an offset per group, which is the
layout's w = q * scale + offset:

    Q4_0  32 values: d (f16), 16 bytes of nibbles    w = d * (q - 8)          4 bits, group 32
    Q4_1  32 values: d, m (f16), 16 bytes of nibbles w = d * q + m            4 bits, group 32
    Q8_0  32 values: d (f16), 32 int8                w = d * q                8 bits, group 32
    Q4_K  256 values: d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
          8 groups of 32: w = d * sc_j * q - dmin * m_j                       4 bits, group 32
    Q6_K  256 values: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d;
          16 groups of 16: w = d * sc_j * (q - 32)                            8 bits, group 16

(In a Q4_0/Q4_1 block, byte j holds value j in its low nibble and value j + 16 in its high one;
Q4_K does the same per 64 values with 32 bytes.) Q6_K's 6-bit values are held in 8 bits, and
Q4_K/Q6_K's products d * sc are kept in float32 (not representable in f16); Q4_0/Q4_1/Q8_0's
scales are f16 in the file and stay f16. The token embedding (and the LM head, tied to it or
not) stays in its blocks too when it is of these types (PackedEmbedding: a lookup unpacks only
the tokens asked for); norms and anything else are dequantized by gguf's own reader, as
transformers' conversion does. llama.cpp stores q and k
with their rotary halves interleaved per head; the rows are put back (transformers' order).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pagewire.model.llama import vocab_parallel_lookup

# GGUF type name -> (bits, group size) in WeightOnlyLinear.
FORMATS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32), "Q4_K": (4, 32), "Q6_K": (8, 16)}
EXACT_IN_F16 = ("Q4_0", "Q4_1", "Q8_0")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    _, layer, part, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16 * c] bytes -> [..., 32 * c] values: per 16 bytes, low nibbles then high ones."""
    lo, hi = qs & 0xF, qs >> 4
    return np.concatenate([lo, hi], axis=-1)


def block_integers(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's blocks (uint8 [num_blocks, block_bytes]) -> unsigned q [values], scales and
    offsets [groups] (float32) with w = q * scale + offset."""
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks[:, 0:2]).reshape(-1)
        start = 2 if kind == "Q4_0" else 4
        offset = -8 * d if kind == "Q4_0" else _f16(blocks[:, 2:4]).reshape(-1)
        return _nibbles(blocks[:, start:start + 16]).reshape(-1), d, offset
    if kind == "Q8_0":
        d = _f16(blocks[:, 0:2]).reshape(-1)
        q = blocks[:, 2:34].view(np.int8).astype(np.int32) + 128
        return q.reshape(-1), d, -128 * d
    if kind == "Q4_K":
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        s = blocks[:, 4:16].astype(np.int32)
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
        # 128 bytes = 4 chunks of 32: low nibbles are 32 values, high nibbles the next 32.
        q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1)
        return q, (d * sc).reshape(-1), (-dmin * mn).reshape(-1)
    if kind == "Q6_K":
        ql = blocks[:, 0:128].reshape(-1, 2, 64).astype(np.int32)
        qh = blocks[:, 128:192].reshape(-1, 2, 32).astype(np.int32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        # Per half of 128 values: four runs of 32, low nibbles of ql[0:32], ql[32:64], then
        # their high nibbles; each with two bits of qh at shifts 0, 2, 4, 6.
        q = np.concatenate([(ql[..., 0:32] & 0xF) | ((qh & 3) << 4),
                            (ql[..., 32:64] & 0xF) | (((qh >> 2) & 3) << 4),
                            (ql[..., 0:32] >> 4) | (((qh >> 4) & 3) << 4),
                            (ql[..., 32:64] >> 4) | (((qh >> 6) & 3) << 4)], axis=-1)
        scale = (d * sc).reshape(-1)
        return q.reshape(-1), scale, -32 * scale
    raise ValueError(f"GGUF type {kind} is not held quantized (formats: {sorted(FORMATS)})")


class PackedEmbedding(nn.Module):
    """A token embedding [vocab, hidden] held as a WeightOnlyLinear of hidden -> vocab (its
    rows are the layout's columns): a lookup gathers and unpacks the columns of the tokens
    asked for; `project` is the LM head's matmul over the same blocks (a tied head).

    Under tensor parallelism it holds the rank's vocabulary rows from vocab_start, as
    VocabParallelEmbedding does: other tokens look up zeros and the ranks' lookups are summed."""

    def __init__(self, layer, dtype: torch.dtype, vocab_start: int = 0, tp=None):
        super().__init__()
        self.layer, self.dtype = layer, dtype
        self.vocab_start, self.tp = vocab_start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self._unpack(ids)
        return vocab_parallel_lookup(ids, self.vocab_start, self.layer.out_features, self.tp,
                                     self._unpack)

    def _unpack(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (local) of the embedding, unpacked: [*ids.shape, hidden]."""
        from pagewire.model.quantization.weight_only import unpack_rows

        flat = ids.reshape(-1)
        layer = self.layer
        q = unpack_rows(layer.qweight.index_select(1, flat), layer.bits)  # [K, T]
        q = q.view(-1, layer.group_size, flat.numel()).to(self.dtype)
        rows = q * layer.scales.index_select(1, flat).to(self.dtype).unsqueeze(1) + \
            layer.offsets.index_select(1, flat).to(self.dtype).unsqueeze(1)
        return rows.view(layer.in_features, -1).t().reshape(*ids.shape, layer.in_features)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden)


class TiedPackedHead(nn.Module):
    """The LM head of a tied model whose embedding stays packed: the embedding's blocks."""

    def __init__(self, embedding: PackedEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: held once

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.project(hidden)


def _unrope_rows(num_rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's interleaving of each head's rotary halves: row r of
    the model's weight is row order[r] of the file's."""
    half = num_rows // heads // 2
    return torch.arange(num_rows).view(heads, half, 2).transpose(1, 2).reshape(-1)


def _quantized_projection(tensor, kind: str, rows_order: torch.Tensor | None,
                          target: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """One GGUF tensor's blocks in WeightOnlyLinear's layout: its own (bits, group), or the
    wider bits and smaller group `target` of a fused layer whose parts differ (the values fit;
    each group's scale and offset repeat over its sub-groups)."""
    from pagewire.model.quantization.weight_only import pack_rows

    n = tensor.data.shape[0]
    raw = np.asarray(tensor.data).reshape(n, -1)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    q, scales, offsets = block_integers(kind, raw.reshape(-1, block_bytes))
    q = torch.from_numpy(q.reshape(n, -1).astype(np.int64)).t()  # [K, N]
    scales = torch.from_numpy(scales.reshape(n, -1)).t()  # [G, N]
    offsets = torch.from_numpy(offsets.reshape(n, -1)).t()
    if rows_order is not None:  # output rows are the layout's columns
        q, scales, offsets = q[:, rows_order], scales[:, rows_order], offsets[:, rows_order]
    bits, group = target or FORMATS[kind]
    repeat = FORMATS[kind][1] // group
    if repeat > 1:
        scales, offsets = scales.repeat_interleave(repeat, 0), offsets.repeat_interleave(repeat, 0)
    return {"qweight": pack_rows(q.contiguous(), bits),
            "scales": scales.contiguous(), "offsets": offsets.contiguous()}


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def layer_format(kinds) -> tuple[int, int]:
    """(bits, group) a layer holds its parts in: the widest bits, the smallest group (GGUF's
    groups, 16 and 32, divide each other). llama.cpp's mixes (Q4_K_M: v in Q6_K beside q and k
    in Q4_K) put several types in one fused layer."""
    unknown = sorted(set(kinds) - set(FORMATS))
    if unknown:
        raise ValueError(f"GGUF type(s) {unknown} are not held quantized (formats: "
                         f"{sorted(FORMATS)}; or use the default float path)")
    return max(FORMATS[k][0] for k in kinds), min(FORMATS[k][1] for k in kinds)


def part_formats(kinds: dict[str, str]) -> dict[str, tuple[int, int]]:
    """projection prefix -> the (bits, group) of the model layer it is fused into."""
    out = {}
    for prefix in kinds:
        head, part = prefix.rsplit(".", 1)
        siblings = next((parts for parts in FUSED.values() if part in parts), (part,))
        out[prefix] = layer_format([kinds[f"{head}.{p}"] for p in siblings
                                    if f"{head}.{p}" in kinds])
    return out


def _projection_kinds(all_kinds: dict[str, str]) -> dict[str, str]:
    """hf projection prefix -> GGUF type name, for the decoder's projections."""
    return {hf_name(name).removesuffix(".weight"): kind for name, kind in all_kinds.items()
            if name.startswith("blk.") and name.split(".")[2] in _LAYER_NAMES
            and "norm" not in name}


def prepare_gguf(model: nn.Module, gguf_path: str, first_layer: int = 0) -> None:
    """WeightOnlyLinear layers in place of the projections, each in its GGUF type's layout
    (a fused layer of mixed types in the widest: layer_format). A tensor-parallel rank's
    layers are its slices already; a pipeline stage's layers are the file's from first_layer
    on (their types may differ from layer to layer)."""
    all_kinds = kinds_all(gguf_path)  # one read of the file's tensor directory
    exact_f16 = all(kind in EXACT_IN_F16 for kind in all_kinds.values() if kind in FORMATS)
    prepare_projections(model, _projection_kinds(all_kinds), exact_f16, first_layer)
    _prepare_embeddings(model, all_kinds, exact_f16)


def prepare_projections(model: nn.Module, kinds: dict[str, str], exact_f16: bool,
                        first_layer: int = 0) -> None:
    for name, module in list(model.named_modules()):
        if name.startswith("layers.") and first_layer:  # the file's numbering of the layer
            parts = name.split(".")
            name = ".".join(["layers", str(int(parts[1]) + first_layer), *parts[2:]])
        for child_name, child in list(module.named_children()):
            if child_name == "lm_head" or not child_name.endswith("_proj"):
                continue
            prefix = "model." + (f"{name}." if name else "")
            parts = FUSED.get(child_name, (child_name,))
            found = [kinds.get(prefix + part) for part in parts]
            if None in found:
                raise ValueError(f"{prefix}{child_name}: the GGUF file lacks a part of it")
            try:
                bits, group = layer_format(found)
            except ValueError as exc:
                raise ValueError(f"{prefix}{child_name}: {exc}") from None
            # f16 scales where the file's are f16: exact, and the file's size
            layer = _packed_layer(child.in_features, child.out_features, (bits, group),
                                  child.weight.dtype, child.weight.device, exact_f16)
            setattr(module, child_name, layer)


def kinds_all(gguf_path: str) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(gguf_path).tensors}


def _packed_layer(in_features, out_features, kind, dtype, device, exact_f16):
    """kind: a GGUF type name, or (bits, group)."""
    from pagewire.model.quantization.weight_only import WeightOnlyLinear

    bits, group = FORMATS[kind] if isinstance(kind, str) else kind
    layer = WeightOnlyLinear(in_features, out_features, bits, group, dtype, device=device)
    scale_dtype = torch.float16 if exact_f16 else torch.float32
    layer.scales, layer.offsets = layer.scales.to(scale_dtype), layer.offsets.to(scale_dtype)
    return layer


def _prepare_embeddings(model: nn.Module, kinds: dict[str, str], exact_f16: bool) -> None:
    """The token embedding and LM head stay in their blocks where their types allow. A
    pipeline stage holds the embedding if it is the first, the head if it is the last (a
    later stage's tied head: its own copy of the embedding's blocks, loaded as lm_head)."""
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    weight = (embed if embed is not None else head).weight
    dtype, device = weight.dtype, weight.device
    vocab, hidden = weight.shape  # this rank's rows of the vocabulary under TP
    kind = kinds.get("token_embd.weight")
    tied = model.spec.tie_word_embeddings or "output.weight" not in kinds
    if kind in FORMATS:
        layer = _packed_layer(hidden, vocab, kind, dtype, device, exact_f16)
        if embed is not None:
            model.embed_tokens = PackedEmbedding(layer, dtype, getattr(embed, "vocab_start", 0),
                                                 getattr(embed, "tp", None))
            if tied and head is not None:
                model.lm_head = TiedPackedHead(model.embed_tokens)
        elif tied and head is not None:
            model.lm_head = layer
    if not tied and head is not None and kinds.get("output.weight") in FORMATS:
        model.lm_head = _packed_layer(hidden, vocab, kinds["output.weight"], dtype, device,
                                      exact_f16)


def gguf_tensors(gguf_path: str, num_heads: int, num_kv_heads: int
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors under Hugging Face names: projections in WeightOnlyLinear's layout,
    everything else dequantized to float32."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    targets = part_formats(_projection_kinds({t.name: t.tensor_type.name
                                              for t in reader.tensors}))
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        prefix = name.removesuffix(".weight")
        part = prefix.rsplit(".", 1)[-1]
        kind = tensor.tensor_type.name
        heads = {"q_proj": num_heads, "k_proj": num_kv_heads}.get(part)
        packed_embedding = part in ("embed_tokens", "lm_head") and kind in FORMATS
        if (part.endswith("_proj") and part != "lm_head") or packed_embedding:
            order = None if heads is None else _unrope_rows(tensor.data.shape[0], heads)
            if part == "embed_tokens":
                prefix += ".layer"
            target = targets.get(prefix)
            for key, value in _quantized_projection(tensor, kind, order, target).items():
                yield f"{prefix}.{key}", value
            continue
        values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type),
                                           dtype=np.float32))
        yield name, values.reshape([int(d) for d in reversed(tensor.shape)])
