"""The n-gram proposer (prompt lookup): guesses that text seen earlier repeats.

The sequence's last n tokens are looked up earlier in the sequence (prompt and output), for n
from prompt_lookup_max down to prompt_lookup_min; at the latest earlier match, the tokens that
followed it are the draft. It costs no model and pays off where the answer quotes its prompt
(code edits, summaries with quotes, extraction). Runs on the host, over numpy views of the
token list.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `token_ids`; [] when no suffix recurs."""
        num_tokens = len(token_ids)
        if k < 1 or num_tokens < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            # Windows that start early enough to have a token after them, excluding the suffix.
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                # The latest match with k tokens after it (the nearest context), else the
                # earliest (the longest continuation: a repeating loop's latest match has one).
                whole = hits[hits + n + k <= num_tokens]
                start = int(whole[-1] if whole.size else hits[0]) + n
                return token_ids[start:start + k]
        return []
