"""The verifier keeps the target distribution: chi-square against the exact probabilities on a
small vocabulary, for point-mass (n-gram) drafts and for drafts sampled from a proposal q, with
temperature, top-k, top-p and min-p; greedy accepts exactly the argmax. Seeded, so a run is
reproducible (the 1e-3 threshold is a property of the test, not of luck on one machine)."""

from __future__ import annotations

import pytest
import torch

from pagewire.sampling.params import SamplingParams
from pagewire.sampling.sampler import SamplingMetadata, filtered_probs
from pagewire.spec_decode.rejection import verify
from tests.spec_decode.chi_square import goodness_of_fit, p_value

VOCAB = 9
N = 20_000  # sequences, each: one draft row + the bonus row


def metadata(params: SamplingParams, rows: int) -> SamplingMetadata:
    return SamplingMetadata.build([params] * rows, [[0]] * rows, [[]] * rows, [None] * rows,
                                  VOCAB, "cpu")


def run(params: SamplingParams, drafts: torch.Tensor, draft_probs=None, seed: int = 0):
    """N sequences sharing two rows of logits (row 0 judges the draft, row 1 the bonus)."""
    torch.manual_seed(seed)
    logits = torch.randn(2, VOCAB) * 1.5
    rows = logits.repeat(N, 1)  # [2N, V]: sequence i owns rows 2i, 2i+1
    row_draft = torch.stack([drafts, torch.full((N,), -1)], dim=1).reshape(-1)
    seq_rows = torch.arange(2 * N).reshape(N, 2)
    q = None if draft_probs is None else torch.stack(
        [draft_probs.expand(N, VOCAB), torch.zeros(N, VOCAB)], dim=1).reshape(-1, VOCAB)
    torch.manual_seed(seed + 1)
    out, accepted = verify(rows, metadata(params, 2 * N), row_draft, seq_rows, q)
    target = filtered_probs(logits, metadata(params, 2))
    return out.sampled_token_ids.reshape(N, 2), accepted, target


def assert_distributed(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(tokens, minlength=VOCAB).tolist()
    stat, df = goodness_of_fit(counts, probs.tolist())
    assert p_value(stat, df) > 1e-3, (counts, (probs * len(tokens)).round().tolist())


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6),
          SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.1)]


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "top_k", "top_p", "min_p"])
def test_point_mass_drafts_keep_the_target_distribution(params):
    drafts = torch.full((N,), 3)
    tokens, accepted, target = run(params, drafts)
    assert 0 < accepted.sum() < N  # both branches are exercised
    assert_distributed(tokens[:, 0], target[0])  # accepted draft or residual draw
    # The token after an accepted draft comes from row 1's distribution.
    assert_distributed(tokens[accepted == 1, 1], target[1])


@pytest.mark.parametrize("params", PARAMS[:2], ids=["plain", "top_k"])
def test_drafts_from_a_proposal_keep_the_target_distribution(params):
    generator = torch.Generator().manual_seed(7)
    q = torch.softmax(torch.randn(VOCAB, generator=generator) * 2, dim=0)
    drafts = torch.multinomial(q, N, replacement=True, generator=generator)
    tokens, accepted, target = run(params, drafts, draft_probs=q)
    assert 0 < accepted.sum() < N
    assert_distributed(tokens[:, 0], target[0])


def test_a_draft_that_is_never_in_the_target_support_is_always_rejected():
    params = SamplingParams(temperature=1.0, top_k=1)  # support: the argmax alone
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    wrong = int((logits[0].argmax() + 1) % VOCAB)
    row_draft = torch.tensor([wrong, -1])
    out, accepted = verify(logits, metadata(params, 2), row_draft, torch.tensor([[0, 1]]))
    assert accepted.tolist() == [0]
    assert out.sampled_token_ids[0] == logits[0].argmax()


def test_greedy_accepts_exactly_the_argmax_run():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    best = logits.argmax(dim=1).tolist()
    # Sequence 0: drafts best[0], best[1], then a wrong one; its rows are 0..3.
    row_draft = torch.tensor([best[0], best[1], (best[2] + 1) % VOCAB, -1])
    out, accepted = verify(logits, metadata(SamplingParams(temperature=0), 4), row_draft,
                           torch.tensor([[0, 1, 2, 3]]))
    assert accepted.tolist() == [2]
    assert out.sampled_token_ids[:3].tolist() == best[:3]  # two drafts, then the argmax


def test_sequences_of_different_draft_counts_in_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    best = logits.argmax(dim=1).tolist()
    # Sequence 0 owns rows 0-2 (two drafts, both right); sequence 1 rows 3-4 (one, wrong);
    # padding repeats a sequence's last row.
    row_draft = torch.tensor([best[0], best[1], -1, (best[3] + 1) % VOCAB, -1])
    out, accepted = verify(logits, metadata(SamplingParams(temperature=0), 5), row_draft,
                           torch.tensor([[0, 1, 2], [3, 4, 4]]))
    assert accepted.tolist() == [2, 0]
    assert out.sampled_token_ids.tolist()[:4] == best[:4]
