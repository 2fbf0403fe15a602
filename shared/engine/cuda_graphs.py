"""CUDA graphs for decode steps: one step's ~200 kernel launches replayed as one.

A decode step of a big batch costs the GPU ~10 ms but costs Python tens of ms to launch, layer
by layer (measured on an H100: loadtests/RESULTS.md). A graph captured once per batch size
replays the whole forward from static input buffers; a step copies its inputs in (padded to the
next captured size) and replays. Padding rows write no KV (slot -1) and attend to one token.

Only the Triton path is captured: its kernels take host-side bounds fixed at capture
(max_seq_len = the model's context limit) and read everything else from device tensors. The
torch path builds data-dependent shapes every step and stays eager.

Speculative decoding's verify steps get graphs of their own (query_len = k + 1): every
sequence scores exactly k + 1 positions, those with fewer drafts padded with tokens that write
no KV and whose outputs are dropped; they run through the prefill kernel, whose grid depends
only on the batch size and query length.
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
                 max_model_len: int, block_size: int, device: torch.device,
                 query_len: int = 1):
        """query_len: tokens each sequence scores (1: decode; k + 1: speculative verify)."""
        self.model, self.layer_caches = model, layer_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len, self.block_size, self.query_len = max_model_len, block_size, query_len
        max_batch, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        max_tokens = max_batch * query_len
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32,
                                            device=device) * query_len
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def run(self, input_ids: list[int], positions: list[int], context_lens: list[int],
            block_tables: list[list[int]], patch_inputs=None) -> torch.Tensor:
        """Final hidden states [n * query_len, hidden] of n sequences' query_len tokens each
        (n <= max_batch), sequence by sequence. A verify step pads each sequence to query_len
        with slot -1 tokens (positions still counting on) and drops those rows itself.
        patch_inputs, if given, fixes up the input ids on the device (tokens the host does
        not have yet)."""
        q = self.query_len
        n = len(context_lens)
        size = next(s for s in self.sizes if s >= n)
        pad = (size - n) * q
        slots = [-1 if token < 0 else
                 table[pos // self.block_size] * self.block_size + pos % self.block_size
                 for i, (token, pos) in enumerate(zip(input_ids, positions))
                 for table in (block_tables[i // q],)]
        rows = to_device([[max(t, 0) for t in input_ids] + [0] * pad, positions + [0] * pad,
                          slots + [-1] * pad], torch.long, self.input_ids.device)
        self.input_ids[:size * q].copy_(rows[0])
        self.positions[:size * q].copy_(rows[1])
        self.slot_mapping[:size * q].copy_(rows[2])
        self.seq_lens[:size].copy_(to_device(context_lens + [q] * (size - n), torch.int32,
                                             self.input_ids.device))
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
        return hidden[:n * q]

    def _metadata(self, size: int) -> AttentionMetadata:
        q, tokens = self.query_len, size * self.query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], num_decode_seqs=size if q == 1 else 0,
            max_query_len=q, max_seq_len=self.max_model_len, _query_lens=[q] * size,
            _context_lens=[q] * size, _block_table_lists=[[0]] * size,
            _block_size=self.block_size)

    def _forward(self, size: int, meta: AttentionMetadata) -> torch.Tensor:
        tokens = size * self.query_len
        return self.model(self.input_ids[:tokens], self.positions[:tokens], self.layer_caches,
                          meta)

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
