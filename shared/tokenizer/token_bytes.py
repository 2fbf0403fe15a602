"""The bytes each token id stands for on its own, as OpenAI's logprobs report them.

Decoding a single id is not enough: a byte-level BPE token may hold half a UTF-8 character, and a
standalone decode turns it into U+FFFD. So the vocabulary's own spelling is mapped back to bytes:
GPT-2's byte-to-character alphabet for byte-level BPE, and `▁` plus `<0xNN>` byte fallback for
sentencepiece. Special tokens are their text. Anything else falls back to a standalone decode.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SENTENCEPIECE_SPACE = "\u2581"


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted (char -> byte).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points
    256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    # A Sequence decoder prints as Sequence(decoders=[Replace(...), ByteFallback(...), ...]).
    return set(re.findall(r"(ByteLevel|ByteFallback|Metaspace|Replace)\(", repr(decoder)))


class TokenBytes:
    """Maps token ids to their bytes for one tokenizer; results are cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self._byte_level = "ByteLevel" in kinds
        self._sentencepiece = bool(kinds & {"ByteFallback", "Metaspace", "Replace"})
        self._special = {int(i): str(t) for i, t in
                         getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_ids: Sequence[int]) -> list[bytes]:
        return [self._one(token_id) for token_id in token_ids]

    def _one(self, token_id: int) -> bytes:
        if token_id not in self._cache:
            self._cache[token_id] = self._compute(token_id)
        return self._cache[token_id]

    def _compute(self, token_id: int) -> bytes:
        if token_id in self._special:
            return self._special[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            if all(ch in alphabet for ch in piece):
                return bytes(alphabet[ch] for ch in piece)
        elif self._sentencepiece:
            byte = _BYTE_FALLBACK.match(piece)
            if byte:
                return bytes([int(byte.group(1), 16)])
            return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
        return self._tokenizer.decode([token_id]).encode()
