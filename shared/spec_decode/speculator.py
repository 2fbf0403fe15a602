"""When and for whom the engine speculates, and what it counted.

Each step, before scheduling, the speculator gives every eligible running sequence up to k
draft tokens (n-gram lookup, or the draft model); the scheduler computes them with the
sequence's last token and the runner verifies them (rejection.py). It stays off:
- for the whole step when more sequences run than `disable_by_batch_size`: a big batch is
  compute bound, so the k extra tokens a sequence verifies cost about as much as they save;
- for a sequence that needs per-token state the verifier does not replay across k positions
  (a grammar, repetition/presence/frequency penalties, min_tokens not yet reached): these
  decode one token a step as before, so their output is unchanged;
- for a request whose drafts keep failing (acceptance below `min_acceptance_rate` after
  `warmup_drafts` draft tokens): it would only pay for verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagewire.engine.block_manager import BlockManager
from pagewire.engine.sequence import Sequence
from pagewire.spec_decode.config import SpeculativeConfig
from pagewire.spec_decode.draft_model import DraftModelProposer
from pagewire.spec_decode.ngram import NgramProposer

# Measured with the embedded model (loadtests/RESULTS.md, issue 16's batch sweeps): on an H100
# n-gram speculation gained 1.14x at batch 4 and broke even at 8 (a verify step cannot overlap
# the host's work as plain async decoding does); on CPU it still gained 1.32x at 16, the
# largest batch measured. A bigger target model keeps paying at bigger batches: set
# disable_by_batch_size for it.
DISABLE_BY_BATCH_SIZE = {"cpu": 16, "cuda": 4}


def disable_batch_size(config: SpeculativeConfig, device: str) -> int:
    """Most running sequences a step may have and still speculate."""
    return config.disable_by_batch_size or \
        DISABLE_BY_BATCH_SIZE["cuda" if device.startswith("cuda") else "cpu"]


@dataclass
class SpecDecodeStats:
    """vLLM's counters: drafts (sequence-steps that verified drafts), draft tokens, accepted
    tokens, and accepted tokens by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig, device: str, block_manager: BlockManager,
                 draft: DraftModelProposer | None = None):
        self.config = config
        self.k = config.num_speculative_tokens
        self.disable_by_batch_size = disable_batch_size(config, device)
        self.block_manager = block_manager
        self.draft = draft
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        self._drafted = False  # some sequence may hold drafts from the last proposal

    def propose(self, running: list[Sequence]) -> bool:
        """Sets spec_token_ids on the sequences that speculate this step; True if this step
        speculates at all (its tokens must then reach the host before the next step)."""
        if self._drafted:  # drafts a sequence kept from a step that skipped it are stale
            for seq in running:
                seq.spec_token_ids, seq.spec_draft_probs = [], None
            self._drafted = False
        if not 0 < len(running) <= self.disable_by_batch_size:
            return False  # a big batch pays nothing per step for speculation being on
        self._drafted = True
        chosen = [seq for seq in running if self._eligible(seq)]
        # The token after the drafts needs a place within max_tokens too.
        room = [min(self.k, seq.max_num_tokens - seq.num_tokens - 1) for seq in chosen]
        if self.draft is None:
            for seq, k in zip(chosen, room):
                seq.spec_token_ids = self.ngram.propose(seq.token_ids, k)
            return True
        # The draft model writes its KV up to the next-to-last draft: slots the scheduler would
        # allot the verify step anyway. A sequence without free blocks for them goes without.
        ready = [(seq, k) for seq, k in zip(chosen, room) if k > 0 and
                 self.block_manager.allocate(seq.block_table, seq.num_tokens + k - 1)]
        if ready:
            drafts, probs = self.draft.propose([s for s, _ in ready], [k for _, k in ready])
            for (seq, _), tokens, q in zip(ready, drafts, probs):
                seq.spec_token_ids, seq.spec_draft_probs = tokens, q
        return True

    def _eligible(self, seq: Sequence) -> bool:
        params = seq.params
        if seq.num_pending_tokens or seq.num_computed_tokens != seq.num_tokens - 1:
            return False  # not decoding, or its last token is not on the host yet
        if seq.grammar is not None or params.repetition_penalty != 1.0 or \
                params.presence_penalty or params.frequency_penalty or \
                seq.num_output_tokens < params.min_tokens:
            return False
        config = self.config
        return seq.spec_num_drafted < config.warmup_drafts or \
            seq.spec_num_accepted >= config.min_acceptance_rate * seq.spec_num_drafted

    def record(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """After verification, before the accepted tokens are appended."""
        # The draft's KV is valid through the last accepted draft (or the next-to-last draft).
        seq.spec_draft_computed = min(seq.spec_draft_computed,
                                      len(seq.token_ids) + num_accepted)
        seq.spec_token_ids, seq.spec_draft_probs = [], None
        seq.spec_num_drafted += num_drafted
        seq.spec_num_accepted += num_accepted
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
