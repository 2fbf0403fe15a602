"""Token bytes for logprobs: joined in order they are exactly the text's UTF-8 bytes."""

from __future__ import annotations

import pytest

from pagewire.tokenizer.token_bytes import TokenBytes
from tests.unit.test_detokenizer import build_sentencepiece_tokenizer

TEXTS = ["Hello world", "Grüße 日本語 👋🏽 ok", "tabs\tand\nnewlines  two spaces"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_bytes_join_to_the_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(TokenBytes(tokenizer)(ids)) == text.encode()


@pytest.mark.parametrize("metaspace", [True, False], ids=["metaspace", "llama"])
def test_sentencepiece_bytes_use_space_and_byte_fallback(metaspace):
    sp = build_sentencepiece_tokenizer(metaspace_decoder=metaspace)
    ids = sp.encode("Hello 世界 ab\u00e9", add_special_tokens=False)
    pieces = TokenBytes(sp)(ids)
    assert b"".join(pieces).lstrip(b" ") == "Hello 世界 ab\u00e9".encode()
    assert b"\xc3" in pieces  # é came as two byte-fallback tokens, each its own byte


def test_special_tokens_are_their_text(tokenizer):
    assert TokenBytes(tokenizer)([tokenizer.eos_token_id]) == [tokenizer.eos_token.encode()]
