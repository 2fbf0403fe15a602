"""What each rank of a parallel engine holds: a tensor-parallel slice of every layer
(RankShard), a pipeline stage's layers (PipelineStage), or both (RankPlace: global rank
stage * tp_size + tp_rank).

Attention heads are split by KV-head group (a KV head and the query heads that read it stay on
one rank), as evenly as the groups go: SmolLM2-135M's 3 KV heads over 2 ranks give 2 and 1
(6 and 3 query heads). With fewer KV heads than ranks, each KV head is replicated on the ranks
that share its query heads (vLLM's rule), so the query heads must split evenly then. The MLP's
intermediate width and the vocabulary are split in contiguous, near-equal slices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pagewire.model.llama import ModelSpec


@dataclass(frozen=True)
class Slice:
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


def even_slice(total: int, rank: int, size: int) -> Slice:
    """Contiguous slices whose sizes differ by at most one, the larger first."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return Slice(start, base + (rank < extra))


@dataclass(frozen=True)
class RankShard:
    """One rank's slice of the model: in heads, rows of the intermediate width and of the
    vocabulary."""

    rank: int
    size: int
    q_heads: Slice
    kv_heads: Slice
    intermediate: Slice
    vocab: Slice
    vocab_sizes: tuple[int, ...]  # every rank's share of the vocabulary (the LM head's gather)
    total_q_heads: int  # the whole model's (a row-parallel layer's packed rows are cut by them)
    total_intermediate: int

    @classmethod
    def of(cls, spec: ModelSpec, rank: int, size: int) -> RankShard:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} of {size}")
        group = spec.num_heads // spec.num_kv_heads
        if spec.num_kv_heads >= size:
            kv = even_slice(spec.num_kv_heads, rank, size)
            q = Slice(kv.start * group, kv.size * group)
        else:
            if spec.num_heads % size:
                raise ValueError(f"{spec.num_heads} query heads cannot split over {size} ranks "
                                 f"with {spec.num_kv_heads} KV heads")
            per_rank = spec.num_heads // size
            q = Slice(rank * per_rank, per_rank)
            kv = Slice(q.start // group, 1)  # replicated on the ranks of its group
        return cls(rank, size, q, kv, even_slice(spec.intermediate_size, rank, size),
                   even_slice(spec.vocab_size, rank, size),
                   tuple(even_slice(spec.vocab_size, r, size).size for r in range(size)),
                   spec.num_heads, spec.intermediate_size)

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec this rank's model is built from: its own heads and widths."""
        return dataclasses.replace(spec, num_heads=self.q_heads.size,
                                   num_kv_heads=self.kv_heads.size,
                                   intermediate_size=self.intermediate.size)


@dataclass(frozen=True)
class PipelineStage:
    """One pipeline-parallel rank's layers: a contiguous, near-equal run of them. The first
    stage also holds the embedding, the last the final norm and the LM head."""

    rank: int
    size: int
    layers: Slice

    @classmethod
    def of(cls, spec: ModelSpec, rank: int, size: int) -> PipelineStage:
        if size > spec.num_layers:
            raise ValueError(f"{spec.num_layers} layers cannot split into {size} stages")
        return cls(rank, size, even_slice(spec.num_layers, rank, size))

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        return dataclasses.replace(spec, num_layers=self.layers.size)


@dataclass(frozen=True)
class RankPlace:
    """Where a rank sits in an engine of tp_size x pp_size processes: global rank
    stage * tp_size + tp_rank, so rank 0 (the engine) is the first stage's first TP rank. Its
    shard (None without TP) and stage (None without PP) say what it holds."""

    rank: int
    tp_size: int
    pp_size: int
    shard: RankShard | None
    stage: PipelineStage | None

    @classmethod
    def of(cls, spec: ModelSpec, rank: int, tp_size: int, pp_size: int) -> RankPlace:
        stage_index, tp_rank = divmod(rank, tp_size)
        return cls(rank, tp_size, pp_size,
                   RankShard.of(spec, tp_rank, tp_size) if tp_size > 1 else None,
                   PipelineStage.of(spec, stage_index, pp_size) if pp_size > 1 else None)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def stage_index(self) -> int:
        return self.rank // self.tp_size

    def rank_in_stage(self, stage_index: int) -> int:
        """The global rank with this rank's TP slice in another stage (activations go there)."""
        return stage_index * self.tp_size + self.tp_rank

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        if self.stage is not None:
            spec = self.stage.local_spec(spec)
        return spec if self.shard is None else self.shard.local_spec(spec)

    def kv_slices(self, spec: ModelSpec) -> tuple[Slice, Slice]:
        """(layers, KV heads) of the whole model's KV that this rank's cache holds."""
        layers = Slice(0, spec.num_layers) if self.stage is None else self.stage.layers
        heads = Slice(0, spec.num_kv_heads) if self.shard is None else self.shard.kv_heads
        return layers, heads
