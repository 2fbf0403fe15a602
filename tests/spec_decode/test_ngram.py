"""The n-gram proposer: the longest recurring suffix wins, the nearest match with k tokens after
it is taken, and nothing is proposed without a match."""

from pagewire.spec_decode.ngram import NgramProposer


def test_the_tokens_after_the_latest_match_of_the_longest_suffix():
    proposer = NgramProposer(min_n=2, max_n=4)
    assert proposer.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]
    # [7, 8] recurs twice; the later match is the nearer context.
    assert proposer.propose([7, 8, 1, 7, 8, 2, 0, 7, 8], 1) == [2]
    # A 3-token suffix beats a 2-token one.
    assert proposer.propose([5, 6, 1, 4, 5, 6, 2, 0, 4, 5, 6], 1) == [2]


def test_no_match_no_draft_and_short_continuations():
    proposer = NgramProposer(min_n=2, max_n=3)
    assert proposer.propose([1, 2, 3, 4], 3) == []
    assert proposer.propose([1, 2], 3) == []
    assert proposer.propose([1, 2, 3, 1, 2], 0) == []
    assert proposer.propose([1, 2, 3, 1, 2], 5) == [3, 1, 2]  # only what follows the match
