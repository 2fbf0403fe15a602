"""Stop-string matching on streamed text.

Text arrives in chunks (one per detokenizer step) and a stop string may straddle chunks, so the
matcher holds back the longest tail of the text that could still begin a stop string. It must
never emit part of a stop string, and never re-scan the output per chunk: an Aho-Corasick
automaton carries the match state between chunks, so a character costs O(1) amortized however
many stop strings there are.

Which match wins: the text stops at the first character where some stop string is complete
(earliest end); of those ending there, the longest (earliest start). That is what checking after
every character gives, so the result does not depend on how the text was chunked. vLLM instead
takes the first stop string in list order found in the new text, which can depend on chunking.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class _Automaton:
    """Aho-Corasick over the stop strings; node 0 is the root (the empty prefix)."""

    goto: list[dict[str, int]]
    fail: list[int]  # node of the longest proper suffix that is also a trie node
    depth: list[int]  # length of the prefix the node stands for
    match_len: list[int]  # longest stop string ending at this node (0: none)

    def step(self, node: int, char: str) -> int:
        while node and char not in self.goto[node]:
            node = self.fail[node]
        return self.goto[node].get(char, 0)


@functools.lru_cache(maxsize=64)  # requests tend to share stop lists (chat templates)
def _build_automaton(stop: tuple[str, ...]) -> _Automaton:
    goto: list[dict[str, int]] = [{}]
    depth = [0]
    is_end = [False]
    for stop_str in stop:
        node = 0
        for char in stop_str:
            if char not in goto[node]:
                goto[node][char] = len(goto)
                goto.append({})
                depth.append(depth[node] + 1)
                is_end.append(False)
            node = goto[node][char]
        is_end[node] = True
    fail = [0] * len(goto)
    match_len = [0] * len(goto)
    queue = deque(goto[0].values())
    for node in queue:
        match_len[node] = depth[node] if is_end[node] else 0
    while queue:  # breadth first, so a node's fail target is finished before the node
        node = queue.popleft()
        for char, child in goto[node].items():
            target = fail[node]
            while target and char not in goto[target]:
                target = fail[target]
            fail[child] = goto[target].get(char, 0)
            match_len[child] = depth[child] if is_end[child] else match_len[fail[child]]
            queue.append(child)
    return _Automaton(goto, fail, depth, match_len)


class StopStringMatcher:
    """Filters one sequence's streamed text, stopping at the first stop string."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(stop_str == "" for stop_str in stop):
            raise ValueError("stop strings must be non-empty")
        self._automaton = _build_automaton(tuple(stop))
        self._include_stop_str = include_stop_str_in_output
        self._node = 0
        self._held_text = ""  # always the last depth[_node] characters fed
        self._matched_stop: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched_stop is not None

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, for the sequence's stop_reason."""
        return self._matched_stop

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped). Not to be called once stopped."""
        assert not self.stopped, "feed() after a stop string matched"
        text = self._held_text + new_text
        node = self._node
        for index, char in enumerate(new_text, start=len(self._held_text)):
            node = self._automaton.step(node, char)
            match_len = self._automaton.match_len[node]
            if match_len:
                return self._stop(text, start=index + 1 - match_len, end=index + 1), True
        self._node = node
        num_held = self._automaton.depth[node]
        assert num_held <= len(text)
        self._held_text = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """At the end without a stop: releases the held-back text."""
        held_text = self._held_text
        self._held_text = ""
        self._node = 0
        return held_text

    def _stop(self, text: str, start: int, end: int) -> str:
        self._matched_stop = text[start:end]
        self._held_text = ""
        return text[:end] if self._include_stop_str else text[:start]
