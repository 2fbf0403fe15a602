"""What rank 0 sends the other ranks each step, as int64 host tensors over the group's control
channel (no pickle): a fixed header, then one flat body. The followers rebuild the step's
attention metadata from it and run the same forward, so every rank's collectives meet.

    header  [kind, num_seqs, num_tokens, num_logit_rows, table_width, value]
    body    num_new[num_seqs] + context_lens[num_seqs] + input_ids[num_tokens] +
            positions[num_tokens] + logit_rows[num_logit_rows] + block_tables[num_seqs x width]

A STEP's value is IDS_ON_DEVICE when some input tokens are still on rank 0's device (async
scheduling: the step before sampled them and has not been read back): the body holds 0 there,
and the step's input ids follow as a broadcast on the data group, in stream order, so neither
rank 0 nor a follower waits for the device to send or receive them.

READ_BLOCKS and WRITE_BLOCKS (a KV export or import) carry block ids instead (header value:
how many); the blocks themselves follow as a gather or a broadcast (parallel/kv_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STOP, STEP, PROFILE, ALLOCATE, READ_BLOCKS, WRITE_BLOCKS = 0, 1, 2, 3, 4, 5
HEADER = 6
IDS_ON_DEVICE = 1


@dataclass
class StepInputs:
    num_new: list[int]
    context_lens: list[int]
    input_ids: list[int]
    positions: list[int]
    logit_rows: list[int]
    block_tables: list[list[int]]


def _broadcast(group, values: list[int]) -> None:
    group.broadcast_host(torch.tensor(values, dtype=torch.long))


def _receive(group, n: int) -> list[int]:
    return group.broadcast_host(torch.empty(n, dtype=torch.long)).tolist()


def send(group, kind: int, step: StepInputs | None = None, value: int = 0) -> None:
    """Rank 0: the message to every other rank."""
    if step is None:
        _broadcast(group, [kind, 0, 0, 0, 0, value])
        return
    width = max((len(t) for t in step.block_tables), default=0)
    header = [kind, len(step.num_new), len(step.input_ids), len(step.logit_rows), width, value]
    tables = [t + [0] * (width - len(t)) for t in step.block_tables]
    body = (step.num_new + step.context_lens + step.input_ids + step.positions +
            step.logit_rows + [b for t in tables for b in t])
    _broadcast(group, header)
    _broadcast(group, body)


def send_block_ids(group, kind: int, block_ids: list[int]) -> None:
    _broadcast(group, [kind, 0, 0, 0, 0, len(block_ids)])
    _broadcast(group, block_ids)


def receive(group) -> tuple[int, int, StepInputs | list[int] | None]:
    """A follower: (kind, value, the step's inputs, the block ids, or None)."""
    kind, seqs, tokens, rows, width, value = _receive(group, HEADER)
    if kind in (READ_BLOCKS, WRITE_BLOCKS):
        return kind, value, _receive(group, value)
    if kind != STEP:
        return kind, value, None
    sizes = [seqs, seqs, tokens, tokens, rows, seqs * width]
    parts = _receive(group, sum(sizes))
    out, offset = [], 0
    for n in sizes:
        out.append(parts[offset:offset + n])
        offset += n
    num_new, context_lens, ids, positions, logit_rows, flat = out
    tables = [flat[i * width:(i + 1) * width] for i in range(seqs)]
    # Padding past a context's blocks is never read: attention stops at its length.
    return kind, value, StepInputs(num_new, context_lens, ids, positions, logit_rows, tables)
