"""Verification of draft tokens: rejection sampling that keeps the target model's distribution.

The target model scores a sequence's last token and its k drafts in one forward, giving k+1
rows of logits; row j is the distribution p_j of the token after draft j (row 0: after the
last real token). Draft d_{j+1} is accepted with probability min(1, p_j(d)/q_j(d)), where q_j
is the proposer's distribution (a point mass on d for n-gram drafts, so the test is u < p_j(d)).
At the first rejection the token is drawn from the residual max(0, p_j - q_j), renormalized;
if every draft is accepted, a bonus token is drawn from p_k. Each emitted token is then
distributed exactly as p_j (Leviathan et al. 2023; Chen et al. 2023): for a point mass,
P(x) = p(d)[x=d] + (1 - p(d)) * p(x)[x!=d] / (1 - p(d)) = p(x). Greedy rows accept a draft
iff it is the argmax, so greedy output equals non-speculative greedy token for token.

p_j is the distribution plain sampling would draw from: temperature, min_p, top_k, top_p
applied by the sampler's own functions. Everything is whole-batch tensor ops, no host syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pagewire.sampling.params import GREEDY_TEMPERATURE_EPS
from pagewire.sampling.sampler import (
    SamplerOutput,
    SamplingMetadata,
    apply_penalties,
    exponential_noise,
    filtered_probs,
)


def verify(logits: Tensor, meta: SamplingMetadata, row_draft: Tensor, seq_rows: Tensor,
           draft_probs: Tensor | None = None) -> tuple[SamplerOutput, Tensor]:
    """Samples every row and decides acceptance.

    logits: [R, V], one row per scored position, each sequence's rows contiguous.
    meta: SamplingMetadata of the R rows (a sequence's settings repeated on its rows).
    row_draft: [R] int64, the draft token each row judges, -1 on a sequence's last row.
    seq_rows: [S, K+1] int64, sequence s's rows in order, padded by repeating its last row.
    draft_probs: [R, V] the proposer's q_j (rows with a draft), None for point-mass drafts.

    Returns the per-row output (sampled_token_ids[r]: the draft where accepted, else the
    token drawn at r; a sequence emits its first num_accepted[s] + 1 rows) and num_accepted [S].
    """
    raw_logprobs = None
    if meta.max_num_logprobs is not None:
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    logits = apply_penalties(logits.float(), meta)
    has_draft = row_draft >= 0
    draft = row_draft.clamp(min=0)
    greedy_ids = logits.argmax(dim=-1)
    greedy_accept = has_draft & (greedy_ids == draft)
    if meta.all_greedy:
        accept, drawn = greedy_accept, greedy_ids
    else:
        probs = filtered_probs(logits, meta)
        p_draft = probs.gather(1, draft.unsqueeze(1)).squeeze(1)
        if draft_probs is None:  # q is a point mass on the draft: the residual drops it
            q_draft = torch.ones_like(p_draft)
            residual = probs.scatter(1, draft.unsqueeze(1), 0.0)
        else:
            q_draft = draft_probs.gather(1, draft.unsqueeze(1)).squeeze(1)
            residual = (probs - draft_probs).clamp_(min=0.0)
        residual = torch.where(has_draft.unsqueeze(1), residual, probs)
        noise = exponential_noise(residual, meta.generators)
        uniform = _uniform(p_draft, meta.generators)
        drawn_random = (residual / noise.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(-1)
        random_accept = has_draft & (uniform * q_draft < p_draft)
        greedy_rows = meta.temperature < GREEDY_TEMPERATURE_EPS
        accept = torch.where(greedy_rows, greedy_accept, random_accept)
        drawn = torch.where(greedy_rows, greedy_ids, drawn_random)
    tokens = torch.where(accept, draft, drawn)
    # Accepted drafts count up to the first rejection; padding repeats the last row, which
    # has no draft, so it always stops the run.
    num_accepted = accept[seq_rows].long().cumprod(dim=1).sum(dim=1)
    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, None), num_accepted
    sampled = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)
    return SamplerOutput(tokens, sampled, top.indices, top.values), num_accepted


def _uniform(like: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    values = torch.rand_like(like)
    for row, generator in enumerate(generators):
        if generator is not None:
            values[row] = torch.rand((), generator=generator, device=like.device)
    return values
