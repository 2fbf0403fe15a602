"""Runs one scheduled step on the device: flattens the batch, runs the model over the paged
KV cache, samples the sequences whose tokens are all computed.

Owns the model weights and the KV cache tensor [layers, 2, num_blocks, block_size, kv_heads,
head_dim]; each layer sees its slice. Block-level reads and writes of that tensor serve KV export
and import (kv_transfer.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig

from pagewire.config import EngineConfig
from pagewire.device_copies import HostCopy, to_device
from pagewire.engine.cuda_graphs import DecodeGraphs
from pagewire.engine.scheduler import ScheduledBatch
from pagewire.engine.sequence import Sequence
from pagewire.kv_transport.shared_memory import SharedMemoryFolder
from pagewire.model.attention import build_attention_metadata
from pagewire.model.cpu_kernels import paged_decode_attention_op
from pagewire.model.llama import LlamaForCausalLM, ModelSpec
from pagewire.model.model_source import ModelSource
from pagewire.model.quantization import (
    CHECKPOINT_METHODS,
    checkpoint_method,
    checkpoint_tensors,
    prepare_for_checkpoint,
    quantize_model,
)
from pagewire.model.quantization.gguf import gguf_tensors, prepare_gguf
from pagewire.model.weights import init_dummy_weights, iter_safetensors, load_weights
from pagewire.parallel import kv_blocks, step_message
from pagewire.parallel.step_message import StepInputs
from pagewire.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata
from pagewire.spec_decode.draft_model import DraftModelProposer
from pagewire.spec_decode.rejection import verify
from pagewire.spec_decode.speculator import disable_batch_size
from pagewire.structured_output.grammars import BatchMasks

CPU_KV_CACHE_BYTES = 1 << 30
logger = logging.getLogger(__name__)


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
    """Sampled tokens of the sequences that finished computing their tokens this step. The
    tokens stay on the device (the next step may read them there) while a copy to the host
    runs in the background; host_output() waits for that copy alone."""

    seqs: list[Sequence]
    output: SamplerOutput | None
    host_copy: HostCopy | None = None
    row_of: dict[Sequence, int] = field(default_factory=dict)
    # The next step needs these sequences' tokens on the host first: penalties count them, a
    # grammar's mask for the next token depends on them, the proposer reads them.
    needs_host_tokens: bool = False
    # A verify step (speculative drafts): rows per sequence (1 + its drafts); the output has
    # one row per scored position and host_output()'s num_accepted says how many were kept.
    num_rows: list[int] | None = None
    # Pipeline parallelism: the logits are still in the pipeline; this samples once they are
    # back (host_output calls it), so the next micro-batch's first stage runs meanwhile.
    sample_later: Callable[[], StepResult] | None = None
    micro_batch: int = 0  # the scheduler's micro-batch whose step this is

    @property
    def samples(self) -> bool:
        return self.output is not None or self.sample_later is not None

    def host_output(self) -> SamplerOutput:
        if self.sample_later is not None:
            sampled, self.sample_later = self.sample_later(), None
            self.output, self.host_copy = sampled.output, sampled.host_copy
            self.num_rows = sampled.num_rows  # a verify step's rows (speculative drafts)
        assert self.output is not None and self.host_copy is not None
        return SamplerOutput(*self.host_copy.wait()[:4])

    def host_num_accepted(self) -> list[int]:
        """Per sequence, how many of its drafts the target accepted (a verify step)."""
        assert self.num_rows is not None and self.host_copy is not None
        return self.host_copy.wait()[4].tolist()


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_torch_dtype
        hf_config = AutoConfig.from_pretrained(source.model_dir)
        # The checkpoint's own quantization, if any, decides how its weights load.
        config = self.config = config.replace(
            quantization=checkpoint_method(hf_config, config.quantization))
        self.spec = ModelSpec.from_hf_config(hf_config)
        # Tensor or pipeline parallelism: this process is rank 0; the others hold the other
        # slices (parallel/). self.tp is the group of all ranks, which step messages cross;
        # self.place says what this rank holds (RankPlace).
        self.tp, self.followers, self.place = None, [], None
        self.local_spec = self.spec  # this rank's heads, widths and layers (all at size 1)
        if config.parallel_size > 1:
            self._start_parallel()
        self.model = self._load_model(source)
        speculative = config.speculative_config
        self.draft = None  # the draft model of speculative decoding, with its own cache
        if speculative is not None and speculative.method == "draft_model":
            self.draft = DraftModelProposer(speculative.model, config, self.spec)
        self.sampler = Sampler()
        self.grammar_masks = BatchMasks(self.spec.vocab_size)
        self.kv_info = self._plan_kv_cache()
        self.kv_cache_file: str | None = None  # in config.kv_cache_shared_dir, when there
        self.kv_cache = self._allocate_kv_cache(
            (self.local_spec.num_layers, 2, self.kv_info.num_blocks, config.block_size,
             self.local_spec.num_kv_heads, self.spec.head_dim))
        if self.tp is not None:
            step_message.send(self.tp, step_message.ALLOCATE, value=self.kv_info.num_blocks)
        self.layer_caches = list(self.kv_cache.unbind(0))
        if self.draft is not None:
            self.draft.allocate_cache(self.kv_info.num_blocks)
        self.decode_graphs = self.verify_graphs = None
        if config.use_cuda_graphs:
            max_model_len = min(config.max_model_len or self.spec.max_context,
                                self.spec.max_context)
            self.decode_graphs = DecodeGraphs(self.model, self.layer_caches, config.seq_limit,
                                              max_model_len, config.block_size, self.device)
            if speculative is not None:  # verify steps: k + 1 tokens per sequence
                self.verify_graphs = DecodeGraphs(
                    self.model, self.layer_caches,
                    min(config.seq_limit, disable_batch_size(speculative, config.device)),
                    max_model_len, config.block_size, self.device,
                    query_len=speculative.num_speculative_tokens + 1)

    def _load_model(self, source: ModelSource) -> LlamaForCausalLM:
        return load_model(self.spec, source, self.config, self.place, self.tp)

    def _start_parallel(self) -> None:
        """Launches ranks 1..size-1 (parallel/follower.py) and joins their group as rank 0."""
        from pagewire.launcher import free_port
        from pagewire.parallel import follower
        from pagewire.parallel.group import TPGroup

        size = self.config.parallel_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.followers = [follower.start(self.config, rank, size, init_method)
                          for rank in range(1, size)]
        self.tp = TPGroup(0, size, init_method, self.device)
        self.place = rank_place(self.spec, self.config, 0)
        self.local_spec = self.place.local_spec(self.spec)
        # Stops the ranks when this runner is collected or the process exits, whichever is
        # first (an atexit hook on self would keep the model alive until exit).
        self._stop_ranks = weakref.finalize(self, stop_ranks, self.tp, self.followers)

    def _gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return gather_rank_blocks(self.tp, self.spec, self.config, self.kv_cache, block_ids)

    def close(self) -> None:
        """Stops the other ranks (idempotent)."""
        if self.tp is not None:
            self.tp = None
            self._stop_ranks()

    def _allocate_kv_cache(self, shape: tuple[int, ...]) -> torch.Tensor:
        folder = self.config.kv_cache_shared_dir
        if folder and self.device.type == "cpu":
            num_bytes = self.kv_info.num_blocks * self.kv_info.block_bytes
            try:  # zeroed by fallocate, like torch.zeros
                self.kv_cache_file, data = SharedMemoryFolder(folder).create_cache(num_bytes)
                return data.view(self.kv_dtype).view(shape)
            except OSError as exc:
                logger.warning("KV cache kept in private memory, not in %s (%s): no shm KV "
                               "transport into this worker", folder, exc)
        return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def _block_bytes(self) -> int:
        spec = self.local_spec  # this rank's KV heads
        return (2 * spec.num_layers * self.config.block_size * spec.num_kv_heads * spec.head_dim
                * torch.finfo(self.kv_dtype).bits // 8)

    def _plan_kv_cache(self) -> KVCacheInfo:
        block_bytes = self._block_bytes()
        budget = self.config.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        elif budget is None:
            budget = CPU_KV_CACHE_BYTES
        # A draft model's cache has as many blocks as this one: the budget holds both.
        draft_bytes = self.draft.block_bytes if self.draft is not None else 0
        num_blocks = budget // (block_bytes + draft_bytes)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {block_bytes}")
        return KVCacheInfo(num_blocks, self.config.block_size, block_bytes)

    def _cuda_kv_budget(self) -> int:
        if self.tp is None:
            return profile_kv_budget(self.model, self.spec, self.config, self.device)
        step_message.send(self.tp, step_message.PROFILE)  # every rank profiles its slice
        return self.tp.min(profile_kv_budget(self.model, self.local_spec, self.config,
                                             self.device))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, in_flight: StepResult | None = None) -> StepResult:
        """Launches the step; returns without waiting for the device. A sequence whose last
        token was sampled by `in_flight` (still running) reads that token on the device."""
        # Decode-shaped sequences (one new token) first: attention groups them.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        num_new = [batch.num_new_tokens[i] for i in order]
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        logit_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        patch_rows: list[int] = []  # input rows whose token is in in_flight's output...
        patch_sources: list[int] = []  # ...at these rows
        num_rows: list[int] = []  # logit rows per sampling sequence: 1 + its drafts
        for seq, n in zip(seqs, num_new):
            start = seq.num_computed_tokens
            known = seq.token_ids[start:start + n]
            spec = seq.spec_token_ids
            if spec and len(known) < n:  # its drafts follow its tokens (never pending then)
                known = known + spec[:n - len(known)]
            if len(known) < n:  # the last input is still on the device
                assert len(known) == n - 1 and in_flight is not None, "input tokens missing"
                patch_rows.append(len(input_ids) + len(known))
                patch_sources.append(in_flight.row_of[seq])
                known = known + [0]
            input_ids.extend(known)
            positions.extend(range(start, start + n))
            context_lens.append(start + n)
            if start + n == seq.num_tokens + len(spec):  # all computed: sample the next
                rows = 1 + len(spec)  # and verify each draft
                logit_rows.extend(range(len(input_ids) - rows, len(input_ids)))
                num_rows.append(rows)
                sampling_seqs.append(seq)
        patch = None
        if patch_rows:
            rows = to_device(patch_rows, torch.long, self.device)
            sources = to_device(patch_sources, torch.long, self.device)

            def patch(ids: torch.Tensor) -> None:
                ids[rows] = in_flight.output.sampled_token_ids[sources]
        hidden = self._forward(seqs, num_new, input_ids, positions, context_lens, patch,
                               logit_rows)
        if not sampling_seqs:
            return StepResult([], None)
        if self.place is not None and self.place.stage is not None:  # in the pipeline still
            logits_back = self.model.receive_logits(len(logit_rows), hidden.device)
            return StepResult(sampling_seqs, None, row_of={s: row for row, s in
                                                           enumerate(sampling_seqs)},
                              sample_later=lambda: self._sample(logits_back(), sampling_seqs,
                                                                num_rows))
        if len(logit_rows) < hidden.shape[0]:
            hidden = hidden[to_device(logit_rows, torch.long, self.device)]
        return self._sample(self.model.compute_logits(hidden), sampling_seqs, num_rows)

    def _sample(self, logits: torch.Tensor, sampling_seqs: list[Sequence],
                num_rows: list[int]) -> StepResult:
        if sum(num_rows) > len(sampling_seqs):
            return self._verify(logits, sampling_seqs, num_rows)
        self._mask_stops_before_min_tokens(logits, sampling_seqs)
        grammars = [s.grammar for s in sampling_seqs]
        self.grammar_masks.apply(logits, grammars)  # host work while the device computes
        sampling = SamplingMetadata.build(
            [s.params for s in sampling_seqs],
            [s.prompt_token_ids for s in sampling_seqs],
            [s.output_token_ids for s in sampling_seqs],
            [s.generator for s in sampling_seqs],
            self.spec.vocab_size, self.device)
        out = self.sampler(logits, sampling)
        return StepResult(sampling_seqs, out, HostCopy([out.sampled_token_ids, out.sampled_logprobs,
                                                   out.top_logprob_ids, out.top_logprobs]),
                          {seq: row for row, seq in enumerate(sampling_seqs)},
                          needs_host_tokens=sampling.output_token_ids is not None or
                          any(g is not None for g in grammars))

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence],
                num_rows: list[int]) -> StepResult:
        """Samples a step in which some sequences carry drafts: every row of theirs is scored
        and their drafts accepted or rejected (spec_decode.rejection). Sequences with drafts
        have no grammar, penalties or pending min_tokens (the engine proposes for none such),
        so only the one-row sequences beside them need those."""
        row_seqs = [seq for seq, rows in zip(seqs, num_rows) for _ in range(rows)]
        last_rows = [row - 1 for row in itertools.accumulate(num_rows)]
        self._mask_stops_before_min_tokens(logits, seqs, last_rows)
        grammars: list = [None] * len(row_seqs)
        for seq, row in zip(seqs, last_rows):
            grammars[row] = seq.grammar
        self.grammar_masks.apply(logits, grammars)
        sampling = SamplingMetadata.build(
            [s.params for s in row_seqs], [s.prompt_token_ids for s in row_seqs],
            [s.output_token_ids for s in row_seqs], [s.generator for s in row_seqs],
            self.spec.vocab_size, self.device)
        drafts = [token for seq in seqs for token in seq.spec_token_ids + [-1]]
        width = max(num_rows)
        seq_rows = [[last - rows + 1 + min(j, rows - 1) for j in range(width)]
                    for last, rows in zip(last_rows, num_rows)]
        draft_probs = None
        if any(seq.spec_draft_probs is not None for seq in seqs):  # the draft model's q
            draft_probs = torch.zeros_like(logits)
            for seq, last, rows in zip(seqs, last_rows, num_rows):
                if seq.spec_draft_probs is not None and rows > 1:
                    draft_probs[last - rows + 1:last] = seq.spec_draft_probs[:rows - 1]
        out, num_accepted = verify(logits, sampling, to_device(drafts, torch.long, self.device),
                                   to_device(seq_rows, torch.long, self.device), draft_probs)
        return StepResult(seqs, out, HostCopy([out.sampled_token_ids, out.sampled_logprobs,
                                               out.top_logprob_ids, out.top_logprobs,
                                               num_accepted]),
                          {seq: row for seq, row in zip(seqs, last_rows)},
                          needs_host_tokens=True, num_rows=num_rows)

    def _forward(self, seqs, num_new, input_ids, positions, context_lens, patch,
                 logit_rows: list[int]) -> torch.Tensor:
        block_tables = [s.block_table for s in seqs]
        verify = self.verify_graphs
        if verify is not None and patch is None and len(seqs) <= verify.max_batch and \
                any(s.spec_token_ids for s in seqs) and \
                all(n <= verify.query_len and s.num_computed_tokens == s.num_tokens - 1
                    for s, n in zip(seqs, num_new)):
            return self._verify_graph_forward(verify, seqs, num_new, input_ids)
        graphs = self.decode_graphs
        if graphs is not None and len(seqs) <= graphs.max_batch and \
                len(input_ids) == len(seqs):  # decode only: one new token per sequence
            return graphs.run(input_ids, positions, context_lens, block_tables, patch)
        ids = to_device(input_ids, torch.long, self.device)
        if patch is not None:
            patch(ids)
        if self.tp is not None:
            step = StepInputs(num_new, context_lens, input_ids, positions, logit_rows,
                              block_tables)
            # Tokens the step in flight sampled follow on the device (step_message.py).
            step_message.send(self.tp, step_message.STEP, step,
                              0 if patch is None else step_message.IDS_ON_DEVICE)
            if patch is not None:
                self.tp.broadcast(ids)
            return run_step(self.model, self.layer_caches, step, self.config.block_size,
                            self.device, ids)
        meta = build_attention_metadata(num_new, context_lens, block_tables,
                                        self.config.block_size, self.device)
        return self.model(ids, to_device(positions, torch.long, self.device),
                          self.layer_caches, meta)

    def _verify_graph_forward(self, graphs: DecodeGraphs, seqs, num_new,
                              input_ids) -> torch.Tensor:
        """A verify step through its CUDA graph: each sequence's tokens padded to the graph's
        query length (pads write no KV; their rows are dropped here)."""
        q = graphs.query_len
        ids, positions, context_lens, rows = [], [], [], []
        offset = 0
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_computed_tokens
            ids += input_ids[offset:offset + n] + [-1] * (q - n)
            positions += list(range(start, start + q))
            context_lens.append(start + q)
            rows += range(i * q, i * q + n)
            offset += n
        hidden = graphs.run(ids, positions, context_lens, [s.block_table for s in seqs])
        return hidden[to_device(rows, torch.long, self.device)]

    def _mask_stops_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence],
                                      seq_rows: list[int] | None = None) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for row, seq in zip(seq_rows or range(len(seqs)), seqs):
            params = seq.params
            # Pending tokens count: this step samples the token after them.
            if seq.num_tokens - seq.num_prompt_tokens < params.min_tokens:
                stop_ids = list(params.stop_token_ids) + list(seq.eos_token_ids)
                rows += [row] * len(stop_ids)
                cols += stop_ids
        if rows:
            logits[to_device(rows, torch.long, self.device),
                   to_device(cols, torch.long, self.device)] = float("-inf")

    def read_blocks(self, block_ids: list[int], out: torch.Tensor | None = None) -> HostCopy:
        """Starts copying blocks out, as [n, layers, 2, block_size, kv_heads, head_dim] on the
        host (pinned). The copy is queued behind the steps already launched and before any
        later one, so the blocks may be freed and reused as soon as this returns. On CPU, `out`
        receives the blocks directly, one copy per block (KVExport.wait fills it on CUDA).
        Under tensor or pipeline parallelism the ranks' heads and layers are gathered: the
        blocks leave whole (parallel/kv_blocks.py)."""
        if self.tp is not None:
            step_message.send_block_ids(self.tp, step_message.READ_BLOCKS, block_ids)
            blocks = self._gather_blocks(block_ids)
            if out is not None:
                out.copy_(blocks)
                return HostCopy([out])
            return HostCopy([blocks])
        if out is not None and self.device.type == "cpu":
            for i, block_id in enumerate(block_ids):
                out[i].copy_(self.kv_cache[:, :, block_id])
            return HostCopy([out])
        index = to_device(block_ids, torch.long, self.device)
        return HostCopy([self.kv_cache.index_select(2, index).movedim(2, 0).contiguous()])

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Queues imported blocks into the cache (from pinned memory when `blocks` is pinned
        already, else staged there) without waiting for the steps in flight. Under tensor or
        pipeline parallelism the blocks (whole) go to every rank, which keeps its own part."""
        if self.tp is not None:
            step_message.send_block_ids(self.tp, step_message.WRITE_BLOCKS, block_ids)
            blocks = kv_blocks.broadcast_blocks(self.tp, blocks, None, self.kv_dtype)
            blocks = kv_blocks.own_part(blocks, *self.place.kv_slices(self.spec))
        write_rank_blocks(self.kv_cache, to_device(block_ids, torch.long, self.device),
                          to_device(blocks, self.kv_dtype, self.device))



def rank_place(spec: ModelSpec, config: EngineConfig, rank: int):
    """What `rank` of a parallel engine holds (parallel/partition.py's RankPlace)."""
    from pagewire.parallel.partition import RankPlace

    return RankPlace.of(spec, rank, config.tensor_parallel_size, config.pipeline_parallel_size)


@torch.inference_mode()
def load_model(spec: ModelSpec, source: ModelSource, config: EngineConfig, place=None,
               group=None, load_format: str | None = None) -> LlamaForCausalLM:
    """The model of `spec` on the config's device and dtype, with its weights (or random
    ones for load_format dummy). place: a parallel rank's RankPlace (its TP slice and its
    pipeline stage); group: the group of all the engine's ranks."""
    device, dtype = torch.device(config.device), config.torch_dtype
    torch.manual_seed(config.seed)
    shard = stage = tp = None
    if place is not None:
        shard, stage = place.shard, place.stage
        if shard is not None:  # the TP ranks of this rank's stage (all ranks without PP)
            tp = group if stage is None else group.subgroup(
                f"stage{place.stage_index}", place.tp_rank, place.tp_size)
    # Made in the target dtype: made in float32 and cast, an 8B model held 48 GB at its
    # peak and left 32 GB cached, so two workers sharing a GPU ran out of memory.
    with torch.device(device), _default_dtype(dtype):
        local = spec if place is None else place.local_spec(spec)
        if stage is not None:
            from pagewire.parallel.pipeline import PipelineStageModel

            model = PipelineStageModel(spec, local, config.use_triton, place, group,
                                       tp).to(dtype)
        else:
            model = LlamaForCausalLM(local, config.use_triton, shard, tp).to(dtype)
    hf_config = AutoConfig.from_pretrained(source.model_dir)
    if config.quantization in CHECKPOINT_METHODS:  # stored quantized: load it as it is
        prepare_for_checkpoint(model, hf_config)
    if config.quantization == "gguf":  # the file's blocks, held packed
        if source.gguf_file is None:
            raise ValueError("quantization='gguf' needs a .gguf model (the embedded default is "
                             f"one); {source.model_dir} is not")
        prepare_gguf(model, source.gguf_file, 0 if stage is None else stage.layers.start)
    if (load_format or config.load_format) == "dummy":
        init_dummy_weights(model, config.seed)
    elif config.quantization == "gguf":
        load_weights(model, gguf_tensors(source.gguf_file, spec.num_heads, spec.num_kv_heads),
                     shard, stage)
    else:
        load_weights(model, checkpoint_tensors(iter_safetensors(source.model_dir), hf_config),
                     shard, stage)
    if config.quantization == "fp8":
        quantize_model(model, config.quantization)
    if device.type == "cpu" and dtype == torch.float32:
        model.pack_for_cpu()
        paged_decode_attention_op()  # compile (once per machine) before the first step
    return model.eval()


def stop_ranks(group, followers) -> None:
    """Tells ranks 1..N-1 to stop, waits for them (killing any that hang), closes the group."""
    with contextlib.suppress(Exception):  # a rank that is already gone
        step_message.send(group, step_message.STOP)
    for process in followers:
        try:
            process.wait(timeout=10)
        except Exception:
            process.kill()
    group.close()


def gather_rank_blocks(group, spec: ModelSpec, config: EngineConfig, kv_cache: torch.Tensor,
                       block_ids: list[int]) -> torch.Tensor:
    """Blocks [n, all layers, 2, bs, all kv heads, D] from every rank's cache (a KV export)."""
    parts = [rank_place(spec, config, rank).kv_slices(spec) for rank in range(group.size)]
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    local = kv_cache.index_select(2, index).movedim(2, 0)
    return kv_blocks.gather_blocks(group, parts, local, spec.num_layers, spec.num_kv_heads)


def write_rank_blocks(kv_cache: torch.Tensor, index: torch.Tensor,
                      blocks: torch.Tensor) -> None:
    """Imported blocks [n, L, 2, bs, heads, D] (this rank's heads) into the cache's blocks
    `index`, both already on the cache's device."""
    blocks = blocks.to(kv_cache.dtype).movedim(0, 2)
    if kv_cache.dtype.itemsize == 1:  # torch has no index_copy_ for fp8 on CPU: copy bytes
        kv_cache.view(torch.uint8).index_copy_(2, index, blocks.view(torch.uint8))
    else:
        kv_cache.index_copy_(2, index, blocks)


def run_step(model, layer_caches, step: StepInputs, block_size: int, device: torch.device,
             ids: torch.Tensor | None = None) -> torch.Tensor:
    """One forward from plain step inputs: rank 0 and its followers run the same one. ids: the
    input ids on the device already (else step.input_ids)."""
    meta = build_attention_metadata(step.num_new, step.context_lens, step.block_tables,
                                    block_size, device)
    if ids is None:
        ids = to_device(step.input_ids, torch.long, device)
    return model(ids, to_device(step.positions, torch.long, device), layer_caches, meta)


def profile_kv_budget(model, spec: ModelSpec, config: EngineConfig,
                      device: torch.device) -> int:
    """What gpu_memory_utilization leaves after the weights and a full-budget forward (spec:
    this rank's, for its KV heads)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = config.token_budget
    num_blocks = -(-num_tokens // config.block_size)
    scratch = torch.zeros((spec.num_layers, 2, num_blocks, config.block_size,
                           spec.num_kv_heads, spec.head_dim),
                          dtype=config.kv_torch_dtype, device=device)
    meta = build_attention_metadata([num_tokens], [num_tokens], [list(range(num_blocks))],
                                    config.block_size, device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    with torch.inference_mode():
        hidden = model(ids, torch.arange(num_tokens, device=device), list(scratch.unbind(0)),
                       meta)
        model.compute_logits(hidden[-min(num_tokens, config.seq_limit):])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch.numel() * scratch.itemsize
    del scratch, hidden
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info(device)
    return int(total * config.gpu_memory_utilization) - peak


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
