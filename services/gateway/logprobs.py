"""Logprobs as OpenAI shapes them: chat's `{"content": [...]}` and the legacy completions table.

Workers send token ids with logprobs; the gateway resolves ids to bytes once (tokenizer service,
cached) and shapes them here. A token that holds part of a UTF-8 character shows U+FFFD in
`token` and its exact bytes in `bytes`, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """One output token: its bytes, its logprob, and the most likely alternatives."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]  # most likely first


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _entry(token: bytes, logprob: float) -> dict:
    return {"token": _text(token), "logprob": logprob, "bytes": list(token)}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict:
    """`choices[i].logprobs` of a chat completion (or of one stream chunk)."""
    return {"content": [
        {**_entry(t.token, t.logprob), "top_logprobs": [_entry(b, lp) for b, lp in t.top]}
        for t in tokens]}


def completion_logprobs(tokens: Sequence[TokenLogprob], text_offset: int = 0) -> dict:
    """`choices[i].logprobs` of a legacy completion; offsets count from `text_offset`.

    As in OpenAI's and vLLM's answers, each top-n table also holds the sampled token.
    """
    offsets, tops = [], []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(_text(t.token))
        top = {_text(b): lp for b, lp in t.top}
        top.setdefault(_text(t.token), t.logprob)
        tops.append(top)
    return {"tokens": [_text(t.token) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}

