"""CUDA graphs for decode steps: one step's ~200 kernel launches replayed as one.

A decode step of a big batch costs the GPU ~10 ms but costs Python tens of ms to launch, layer
by layer (measured on an H100: loadtests/RESULTS.md). A graph captured once per batch size
replays the whole forward from static input buffers; a step copies its inputs in (padded to the
next captured size) and replays. Padding rows write no KV (slot -1) and attend to one token.

Only the Triton path is captured: its kernels take host-side bounds fixed at capture
(max_seq_len = the model's context limit) and read everything else from device tensors. The
torch path builds data-dependent shapes every step and stays eager.
"""

from __future__ import annotations

import torch

from pagewire.device_copies import to_device
from pagewire.model.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    def __init__(self, model, layer_caches: list[torch.Tensor], max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device):
        self.model, self.layer_caches = model, layer_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len, self.block_size = max_model_len, block_size
        max_batch, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def run(self, input_ids: list[int], positions: list[int], context_lens: list[int],
            block_tables: list[list[int]], patch_inputs=None) -> torch.Tensor:
        """Final hidden states [n, hidden] of n decode tokens (n <= max_batch). patch_inputs,
        if given, fixes up the input ids on the device (tokens the host does not have yet)."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        slots = [table[(pos) // self.block_size] * self.block_size + pos % self.block_size
                 for table, pos in zip(block_tables, positions)]
        rows = to_device([input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad,
                          context_lens + [1] * pad], torch.long, self.input_ids.device)
        self.input_ids[:size].copy_(rows[0])
        self.positions[:size].copy_(rows[1])
        self.slot_mapping[:size].copy_(rows[2])
        self.seq_lens[:size].copy_(rows[3])
        if patch_inputs is not None:
            patch_inputs(self.input_ids)
        width = max(len(t) for t in block_tables)
        tables = to_device([t + [0] * (width - len(t)) for t in block_tables], torch.int32,
                           self.input_ids.device)
        self.block_tables[:n, :width].copy_(tables)
        if size not in self._graphs:
            self._graphs[size] = self._capture(size)
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:n]

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            num_decode_seqs=size, max_query_len=1, max_seq_len=self.max_model_len,
            _query_lens=[1] * size, _context_lens=[1] * size, _block_table_lists=[[0]] * size,
            _block_size=self.block_size)

    def _forward(self, size: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.layer_caches, meta)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = self._metadata(size)
        # The real inputs are already in place; capture runs them (warm-up compiles the
        # Triton kernels for these shapes first, outside the graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size, meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(size, meta)
        self._pool = graph.pool()
        return graph, hidden
