"""Runs one scheduled step on the device: flattens the batch, runs the model over the paged
KV cache, samples the sequences whose tokens are all computed.

Owns the model weights and the KV cache tensor [layers, 2, num_blocks, block_size, kv_heads,
head_dim]; each layer sees its slice. Block-level reads and writes of that tensor serve KV export
and import (kv_transfer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig

from pagewire.config import EngineConfig
from pagewire.engine.cuda_graphs import DecodeGraphs
from pagewire.engine.scheduler import ScheduledBatch
from pagewire.engine.sequence import Sequence
from pagewire.model.attention import build_attention_metadata
from pagewire.model.cpu_kernels import paged_decode_attention_op
from pagewire.model.llama import LlamaForCausalLM, ModelSpec
from pagewire.model.model_source import ModelSource
from pagewire.model.weights import init_dummy_weights, iter_safetensors, load_weights
from pagewire.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata

CPU_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class KVCacheInfo:
    num_blocks: int
    block_size: int
    block_bytes: int  # all layers, keys and values

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = "
                f"{self.num_tokens} tokens, {self.num_blocks * self.block_bytes / 2**30:.2f} GiB")


@dataclass
class StepResult:
    """Sampled tokens of the sequences that finished computing their tokens this step."""

    seqs: list[Sequence]
    output: SamplerOutput | None


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        hf_config = AutoConfig.from_pretrained(source.model_dir)
        self.spec = ModelSpec.from_hf_config(hf_config)
        self.model = self._load_model(source)
        self.sampler = Sampler()
        self.kv_info = self._plan_kv_cache()
        self.kv_cache = torch.zeros(
            (self.spec.num_layers, 2, self.kv_info.num_blocks, config.block_size,
             self.spec.num_kv_heads, self.spec.head_dim),
            dtype=self.dtype, device=self.device)
        self.layer_caches = list(self.kv_cache.unbind(0))
        self.decode_graphs = None
        if config.use_cuda_graphs:
            self.decode_graphs = DecodeGraphs(
                self.model, self.layer_caches, config.max_num_seqs,
                min(config.max_model_len or self.spec.max_context, self.spec.max_context),
                config.block_size, self.device)

    @torch.inference_mode()
    def _load_model(self, source: ModelSource) -> LlamaForCausalLM:
        torch.manual_seed(self.config.seed)
        with torch.device(self.device):
            model = LlamaForCausalLM(self.spec, self.config.use_triton).to(self.dtype)
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            load_weights(model, iter_safetensors(source.model_dir))
        if self.device.type == "cpu" and self.dtype == torch.float32:
            model.pack_for_cpu()
            paged_decode_attention_op()  # compile (once per machine) before the first step
        return model.eval()

    def _block_bytes(self) -> int:
        spec = self.spec
        return (2 * spec.num_layers * self.config.block_size * spec.num_kv_heads * spec.head_dim
                * torch.finfo(self.dtype).bits // 8)

    def _plan_kv_cache(self) -> KVCacheInfo:
        block_bytes = self._block_bytes()
        budget = self.config.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        elif budget is None:
            budget = CPU_KV_CACHE_BYTES
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {block_bytes}")
        return KVCacheInfo(num_blocks, self.config.block_size, block_bytes)

    def _cuda_kv_budget(self) -> int:
        """What gpu_memory_utilization leaves after the weights and a full-budget forward."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.token_budget
        num_blocks = -(-num_tokens // self.config.block_size)
        scratch = torch.zeros((self.spec.num_layers, 2, num_blocks, self.config.block_size,
                               self.spec.num_kv_heads, self.spec.head_dim),
                              dtype=self.dtype, device=self.device)
        meta = build_attention_metadata([num_tokens], [num_tokens], [list(range(num_blocks))],
                                        self.config.block_size, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(num_tokens, device=self.device),
                                list(scratch.unbind(0)), meta)
            self.model.compute_logits(hidden[-min(num_tokens, self.config.max_num_seqs):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.itemsize
        del scratch, hidden
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        return int(total * self.config.gpu_memory_utilization) - peak

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        # Decode-shaped sequences (one new token) first: attention groups them.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        num_new = [batch.num_new_tokens[i] for i in order]
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        logit_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        for seq, n in zip(seqs, num_new):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            context_lens.append(start + n)
            if start + n == seq.num_tokens:  # all known tokens computed: sample the next
                logit_rows.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
        block_tables = [s.block_table for s in seqs]
        graphs = self.decode_graphs
        if graphs is not None and len(seqs) <= graphs.max_batch and \
                len(input_ids) == len(seqs):  # decode only: one new token per sequence
            hidden = graphs.run(input_ids, positions, context_lens, block_tables)
        else:
            meta = build_attention_metadata(num_new, context_lens, block_tables,
                                            self.config.block_size, self.device)
            hidden = self.model(torch.tensor(input_ids, device=self.device),
                                torch.tensor(positions, device=self.device),
                                self.layer_caches, meta)
        if not sampling_seqs:
            return StepResult([], None)
        if len(logit_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(logit_rows, device=self.device)]
        logits = self.model.compute_logits(hidden)
        _mask_stops_before_min_tokens(logits, sampling_seqs)
        sampling = SamplingMetadata.build(
            [s.params for s in sampling_seqs],
            [s.prompt_token_ids for s in sampling_seqs],
            [s.output_token_ids for s in sampling_seqs],
            [s.generator for s in sampling_seqs],
            self.spec.vocab_size, self.device)
        return StepResult(sampling_seqs, self.sampler(logits, sampling))

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """[n, layers, 2, block_size, kv_heads, head_dim] on the CPU, for export."""
        index = torch.tensor(block_ids, device=self.device)
        return self.kv_cache.index_select(2, index).movedim(2, 0).contiguous().cpu()

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        index = torch.tensor(block_ids, device=self.device)
        self.kv_cache.index_copy_(2, index, blocks.to(self.device, self.dtype).movedim(0, 2))


def _mask_stops_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        params = seq.params
        if seq.num_output_tokens < params.min_tokens:
            stop_ids = list(params.stop_token_ids) + list(seq.eos_token_ids)
            if stop_ids:
                logits[row, stop_ids] = float("-inf")
