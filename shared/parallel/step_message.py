"""What rank 0 sends the other ranks each step, as int64 tensors (no pickle): a fixed header,
then one flat body. The followers rebuild the step's attention metadata from it and run the
same forward, so every rank's collectives meet.

    header  [kind, num_seqs, num_tokens, num_logit_rows, table_width, value]
    body    num_new[num_seqs] + context_lens[num_seqs] + input_ids[num_tokens] +
            positions[num_tokens] + logit_rows[num_logit_rows] + block_tables[num_seqs x width]

READ_BLOCKS and WRITE_BLOCKS (a KV export or import) carry block ids instead (header value:
how many); the blocks themselves follow as a gather or a broadcast (parallel/kv_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STOP, STEP, PROFILE, ALLOCATE, READ_BLOCKS, WRITE_BLOCKS = 0, 1, 2, 3, 4, 5
HEADER = 6


@dataclass
class StepInputs:
    num_new: list[int]
    context_lens: list[int]
    input_ids: list[int]
    positions: list[int]
    logit_rows: list[int]
    block_tables: list[list[int]]


def send(group, kind: int, step: StepInputs | None = None, value: int = 0) -> None:
    """Rank 0: the message to every other rank (on the group's device)."""
    if step is None:
        header = [kind, 0, 0, 0, 0, value]
        group.broadcast(torch.tensor(header, dtype=torch.long, device=group.device))
        return
    width = max((len(t) for t in step.block_tables), default=0)
    header = [kind, len(step.num_new), len(step.input_ids), len(step.logit_rows), width, value]
    tables = [t + [0] * (width - len(t)) for t in step.block_tables]
    body = (step.num_new + step.context_lens + step.input_ids + step.positions +
            step.logit_rows + [b for t in tables for b in t])
    group.broadcast(torch.tensor(header, dtype=torch.long, device=group.device))
    group.broadcast(torch.tensor(body, dtype=torch.long, device=group.device))


def send_block_ids(group, kind: int, block_ids: list[int]) -> None:
    group.broadcast(torch.tensor([kind, 0, 0, 0, 0, len(block_ids)], dtype=torch.long,
                                 device=group.device))
    group.broadcast(torch.tensor(block_ids, dtype=torch.long, device=group.device))


def receive(group) -> tuple[int, int, StepInputs | list[int] | None]:
    """A follower: (kind, value, the step's inputs, the block ids, or None)."""
    header = group.broadcast(torch.empty(HEADER, dtype=torch.long, device=group.device))
    kind, seqs, tokens, rows, width, value = header.tolist()
    if kind in (READ_BLOCKS, WRITE_BLOCKS):
        ids = group.broadcast(torch.empty(value, dtype=torch.long, device=group.device))
        return kind, value, ids.tolist()
    if kind != STEP:
        return kind, value, None
    sizes = [seqs, seqs, tokens, tokens, rows, seqs * width]
    body = group.broadcast(torch.empty(sum(sizes), dtype=torch.long, device=group.device))
    parts = body.tolist()
    out, offset = [], 0
    for n in sizes:
        out.append(parts[offset:offset + n])
        offset += n
    num_new, context_lens, ids, positions, logit_rows, flat = out
    tables = [flat[i * width:(i + 1) * width] for i in range(seqs)]
    # Padding past a context's blocks is never read: attention stops at its length.
    return kind, value, StepInputs(num_new, context_lens, ids, positions, logit_rows, tables)
