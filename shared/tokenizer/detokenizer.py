"""Incremental detokenization: a growing list of token ids becomes text, one chunk per step.

Byte-level BPE and sentencepiece byte fallback split a character over several tokens, so each step
decodes a small window of tokens (vLLM's prefix/read offsets) and waits while the window's text
ends in U+FFFD, an incomplete character. It must never emit half a character mid-stream, and never
re-decode the whole sequence per step: the window is all the state it keeps.

Guarantee: the chunks of add_tokens() and flush() join to `tokenizer.decode(output_ids)` for
byte-level BPE, and to the output as rendered after the prompt for sentencepiece (a leading space
that a standalone decode would strip is kept). Two documented gaps, both only for byte soup that
no real text encodes to: a window stuck for `max_pending_tokens` tokens is emitted as is, and a
sentencepiece byte-fallback run that turns invalid after a valid prefix was emitted cannot be
taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, as vLLM does
WIDE_CONTEXT_TOKENS = 20  # tried when the last CONTEXT_TOKENS render as nothing (special tokens)
MAX_PENDING_TOKENS = 64  # no real character needs this many tokens to complete


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer: a HF-style decode."""

    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text as they arrive.

    `_token_ids` holds only the window: `[:_read_offset]` was already emitted and serves as
    left context (vLLM's prefix_offset is always 0 here, older tokens are dropped);
    `[_read_offset:]` is pending.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        max_pending_tokens: int = MAX_PENDING_TOKENS,
    ) -> None:
        assert max_pending_tokens >= 1
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._max_pending_tokens = max_pending_tokens
        self._token_ids = self._prompt_context(prompt_token_ids)
        self._read_offset = len(self._token_ids)
        self._output_text = ""
        self._flushed = False

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return self._output_text

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Appends output tokens; returns the text they finalized (may be "")."""
        assert not self._flushed, "add_tokens() after flush()"
        self._token_ids.extend(token_ids)
        num_pending = len(self._token_ids) - self._read_offset
        if num_pending == 0:
            return ""
        prefix_text, window_text = self._decode_window()
        waiting = window_text.endswith(REPLACEMENT_CHAR) or len(window_text) <= len(prefix_text)
        if waiting and num_pending < self._max_pending_tokens:
            # An empty step must not advance either: a sentencepiece decoder strips the leading
            # space of a window whose context renders as nothing.
            return ""
        return self._advance(prefix_text, window_text)

    def flush(self) -> str:
        """At the end of the sequence: emits what is pending, even an incomplete character."""
        self._flushed = True
        if len(self._token_ids) == self._read_offset:
            return ""
        return self._advance(*self._decode_window())

    def _advance(self, prefix_text: str, window_text: str) -> str:
        new_text = window_text[len(prefix_text) :]
        del self._token_ids[: self._read_offset]
        self._read_offset = len(self._token_ids)
        self._output_text += new_text
        return new_text

    def _decode_window(self) -> tuple[str, str]:
        prefix_text = self._decode(self._token_ids[: self._read_offset])
        return prefix_text, self._decode(self._token_ids)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context: list[int] = []
        context_text = ""
        for width in (CONTEXT_TOKENS, WIDE_CONTEXT_TOKENS):
            context = list(prompt_token_ids[-width:])
            context_text = self._decode(context)
            if context_text:
                break
        # A prompt ending mid-character would lend its bytes to the output's first character,
        # which a decode of the output alone renders as U+FFFD: start without context.
        return [] if context_text.endswith(REPLACEMENT_CHAR) else context

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
