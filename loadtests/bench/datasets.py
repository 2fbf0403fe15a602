"""The benchmark's workloads, made from a seed: random lengths, shared prefixes, multi-turn chat.

A workload is a list of sessions; a session is requests sent one after another (one request,
except in multi-turn chat, where each turn carries the history, real replies included). Text is
made of common English words, about one token each; only token-id prompts have exact lengths.
Nothing here talks to a server or needs a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import DatasetConfig

FIRST_ID = 100  # token ids below this are left out: special tokens sit at the bottom

WORDS = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no will more
can out other time some what only into them these two may first then do any like my now over
such our man me even most made after also did many before must through back years where much
your way well down should because each just those people how too little state good very make
world still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right used take
three small house water city light music river garden paper table window morning evening
""".split())


@dataclass(frozen=True)
class BenchRequest:
    """One request: a completion prompt, or one user turn of a chat."""

    output_len: int
    """max_tokens."""
    prompt_len: int
    """Prompt tokens if known exactly (token ids), else this request's new words."""
    prompt: str | list[int] | None = None
    """/v1/completions prompt; None for a chat turn."""
    user: str = ""
    """Chat: this turn's user message."""
    system: str | None = None
    """Chat: the system prompt, first in every turn's messages."""

    @property
    def is_chat(self) -> bool:
        return self.prompt is None


Session = tuple[BenchRequest, ...]


def build_dataset(config: DatasetConfig) -> list[Session]:
    return BUILDERS[config.name](config, np.random.default_rng(config.seed))


def sample_lengths(rng: np.random.Generator, mean: int, range_ratio: float, num: int) -> list[int]:
    """Uniform integers in [mean * (1 - r), mean * (1 + r)], at least 1 (as vLLM's random set)."""
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num).tolist()


def random_text(rng: np.random.Generator, num_words: int) -> str:
    return " ".join(rng.choice(WORDS, size=num_words).tolist())


def _random(config: DatasetConfig, rng: np.random.Generator) -> list[Session]:
    n = config.num_prompts
    input_lens = sample_lengths(rng, config.input_len, config.range_ratio, n)
    output_lens = sample_lengths(rng, config.output_len, config.range_ratio, n)
    sessions = []
    for input_len, output_len in zip(input_lens, output_lens):
        if config.prompt_format == "ids":
            prompt = rng.integers(FIRST_ID, config.vocab_size, size=input_len).tolist()
        else:
            prompt = random_text(rng, input_len)
        sessions.append((BenchRequest(output_len, input_len, prompt=prompt),))
    return sessions


def _shared_prefix(config: DatasetConfig, rng: np.random.Generator) -> list[Session]:
    """K system prompts, each shared by many questions; the order is shuffled, so requests on
    one prefix interleave with the others' (what a prefix-aware router is for)."""
    n = config.num_prompts
    prefixes = [random_text(rng, config.prefix_len) for _ in range(config.num_prefixes)]
    question_lens = sample_lengths(rng, config.input_len, config.range_ratio, n)
    output_lens = sample_lengths(rng, config.output_len, config.range_ratio, n)
    sessions = [(BenchRequest(output_len, config.prefix_len + question_len,
                              user=random_text(rng, question_len),
                              system=prefixes[i % config.num_prefixes]),)
                for i, (question_len, output_len) in enumerate(zip(question_lens, output_lens))]
    return [sessions[i] for i in rng.permutation(n)]


def _multi_turn(config: DatasetConfig, rng: np.random.Generator) -> list[Session]:
    """num_prompts conversations of `turns` user messages each."""
    num_turns = config.num_prompts * config.turns
    user_lens = sample_lengths(rng, config.input_len, config.range_ratio, num_turns)
    output_lens = sample_lengths(rng, config.output_len, config.range_ratio, num_turns)
    turns = [BenchRequest(output_len, user_len, user=random_text(rng, user_len))
             for user_len, output_len in zip(user_lens, output_lens)]
    return [tuple(turns[i:i + config.turns]) for i in range(0, num_turns, config.turns)]


BUILDERS: dict[str, Callable[[DatasetConfig, np.random.Generator], list[Session]]] = {
    "random": _random,
    "shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
}
