"""Incremental detokenizer: streamed chunks join to the full decode, never half a character."""

from __future__ import annotations

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from pagewire.tokenizer.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces and\ttabs\nand newlines\n\n",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00c5ngstr\u00f6m",
    "e\u0301 combining acute, n\u0303 tilde",
    "\u4e16\u754c\u4f60\u597d\uff0c\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002\u65e5\u672c\u8a9e\u306e\u6587",
    "emoji \U0001f600\U0001f680 \U0001f468\u200d\U0001f469\u200d\U0001f467"
    " flags \U0001f1fa\U0001f1f8",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "def f(x):\n    return {'a': [1, 2, 3]}  # \u2713 done",
    "\U0001d54f\U0001d560\U0001d565 math \u2200x\u2208\u211d \u2192 \u221e",
]

UNICODE_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
)


# `tokenizer` (tests/conftest.py): the embedded model's byte-level BPE tokenizer.


def build_sentencepiece_tokenizer(metaspace_decoder: bool):
    """A tiny Unigram model with byte fallback, decoded the Llama way or with Metaspace."""
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{byte:02X}>", 0.0) for byte in range(256)]
    pieces = ["\u2581", "\u2581\u2581", "\u2581Hello", "\u2581world", "\u2581the", "ab", "\u4e16"]
    pieces += list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?")
    vocab += [(piece, -1.0 - rank) for rank, piece in enumerate(pieces)]
    sp = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    if metaspace_decoder:
        sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        sp.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
        )
    else:
        sp.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        sp.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    sp.add_special_tokens(
        [AddedToken(name, special=True) for name in ("<s>", "</s>", "<|im_end|>")]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session", params=["metaspace", "llama"])
def sp_tokenizer(request):
    return build_sentencepiece_tokenizer(metaspace_decoder=request.param == "metaspace")


class DecodeSpy:
    """Wraps a tokenizer and records the longest token list each decode() was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_decode_len = 0

    def decode(self, token_ids, **kwargs):
        self.max_decode_len = max(self.max_decode_len, len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def full_decode(tokenizer, token_ids, skip_special_tokens=True):
    return tokenizer.decode(
        list(token_ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, prompt_ids, output_ids, chunk_sizes=(1,), skip_special_tokens=True):
    """Feeds output_ids in chunks (sizes cycled); returns every returned piece, flush last."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces, start, step = [], 0, 0
    while start < len(output_ids):
        size = max(1, chunk_sizes[step % len(chunk_sizes)])
        pieces.append(detok.add_tokens(output_ids[start : start + size]))
        start, step = start + size, step + 1
    pieces.append(detok.flush())
    assert detok.output_text == "".join(pieces)
    return pieces


def assert_streams_as_full_decode(pieces, expected):
    """Joined pieces equal the full decode, and every piece lands where the full decode has it."""
    assert "".join(pieces) == expected
    emitted = ""
    for piece in pieces[:-1]:  # flush() may end in U+FFFD, when the full decode does too
        assert not piece.endswith(REPLACEMENT_CHAR) or expected.startswith(emitted + piece)
        emitted += piece
        assert expected.startswith(emitted)


# --- byte-level BPE (the embedded model) ---


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    output_ids = encode(tokenizer, text)
    pieces = stream(tokenizer, [], output_ids)
    assert_streams_as_full_decode(pieces, full_decode(tokenizer, output_ids))
    assert "".join(pieces) == text


@pytest.mark.parametrize("text", TEXTS)
def test_no_chunk_holds_a_broken_character(tokenizer, text):
    for piece in stream(tokenizer, encode(tokenizer, "Prompt:"), encode(tokenizer, text)):
        assert REPLACEMENT_CHAR not in piece


def test_split_emoji_is_held_back_until_complete(tokenizer):
    output_ids = encode(tokenizer, " \U0001f600")
    assert len(output_ids) >= 2  # the emoji's bytes straddle tokens
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add_tokens([token_id]) for token_id in output_ids]
    assert pieces[:-1] == [""] * (len(output_ids) - 1)
    assert pieces[-1] == " \U0001f600"


def test_first_output_token_keeps_its_leading_space(tokenizer):
    prompt_ids = encode(tokenizer, "The capital of France is")
    pieces = stream(tokenizer, prompt_ids, encode(tokenizer, " Paris."))
    assert "".join(pieces) == " Paris."


def test_prompt_ending_mid_character_renders_as_output_decode(tokenizer):
    ids = encode(tokenizer, "x\U0001f600\U0001f600")
    split = next(i for i in range(1, len(ids)) if full_decode(tokenizer, ids[:i])[-1:] == "\ufffd")
    prompt_ids, output_ids = ids[:split], ids[split:]
    pieces = stream(tokenizer, prompt_ids, output_ids)
    assert_streams_as_full_decode(pieces, full_decode(tokenizer, output_ids))


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip_special_tokens):
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    output_ids = encode(tokenizer, "Hi there") + [im_end, im_start] + encode(tokenizer, "\nok")
    pieces = stream(tokenizer, [im_start], output_ids, skip_special_tokens=skip_special_tokens)
    expected = full_decode(tokenizer, output_ids, skip_special_tokens)
    assert_streams_as_full_decode(pieces, expected)
    if skip_special_tokens:
        assert "".join(pieces) == "Hi there\nok"
        assert all(piece == "" for piece in pieces if "<|" in piece)
    else:
        assert "".join(pieces) == "Hi there<|im_end|><|im_start|>\nok"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_token_inside_a_split_character(tokenizer, skip_special_tokens):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tokenizer, "\u4e16")
    assert len(ids) >= 2
    output_ids = ids[:1] + [im_end] + ids[1:] + encode(tokenizer, " end")
    pieces = stream(tokenizer, [], output_ids, skip_special_tokens=skip_special_tokens)
    assert_streams_as_full_decode(pieces, full_decode(tokenizer, output_ids, skip_special_tokens))


def test_flush_emits_a_trailing_incomplete_character(tokenizer):
    output_ids = encode(tokenizer, "ok \U0001f600")[:-1]
    detok = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detok.add_tokens([token_id]) for token_id in output_ids)
    assert not streamed.endswith(REPLACEMENT_CHAR)
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT_CHAR)
    assert streamed + tail == full_decode(tokenizer, output_ids)
    assert detok.flush() == ""
    with pytest.raises(AssertionError):
        detok.add_tokens(output_ids[:1])


def test_add_tokens_with_nothing_new_returns_empty(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "a"))
    assert detok.add_tokens([]) == ""
    assert detok.flush() == ""
    assert detok.output_text == ""


def test_decode_window_stays_small_on_long_output(tokenizer):
    spy = DecodeSpy(tokenizer)
    output_ids = encode(tokenizer, " ".join(TEXTS) * 20)
    assert len(output_ids) > 1000
    detok = IncrementalDetokenizer(spy, encode(tokenizer, "prompt " * 100))
    streamed = "".join(detok.add_tokens([token_id]) for token_id in output_ids) + detok.flush()
    assert streamed == full_decode(tokenizer, output_ids)
    assert spy.max_decode_len <= 10


def test_window_of_never_completing_bytes_is_capped(tokenizer):
    # " \xf0\x9f\x98": each token opens an emoji the next one breaks; no token boundary is clean.
    broken_emoji = encode(tokenizer, " \U0001f600")[0]
    assert full_decode(tokenizer, [broken_emoji]).endswith(REPLACEMENT_CHAR)
    output_ids = [broken_emoji] * 500
    spy = DecodeSpy(tokenizer)
    detok = IncrementalDetokenizer(spy, [], max_pending_tokens=16)
    streamed = "".join(detok.add_tokens([token_id]) for token_id in output_ids) + detok.flush()
    assert streamed == full_decode(tokenizer, output_ids)
    assert spy.max_decode_len <= 2 * 16  # emitted context + pending


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prompt=UNICODE_TEXT,
    output=UNICODE_TEXT,
    chunk_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_random_text_streams_as_full_decode(tokenizer, prompt, output, chunk_sizes):
    output_ids = encode(tokenizer, output)
    pieces = stream(tokenizer, encode(tokenizer, prompt), output_ids, chunk_sizes)
    assert_streams_as_full_decode(pieces, full_decode(tokenizer, output_ids))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_random_token_ids_stream_as_full_decode(tokenizer, data, skip_special_tokens):
    token_id = st.integers(0, len(tokenizer) - 1)
    prompt_ids = data.draw(st.lists(token_id, max_size=8))
    output_ids = data.draw(st.lists(token_id, max_size=30))
    chunk_sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    pieces = stream(tokenizer, prompt_ids, output_ids, chunk_sizes, skip_special_tokens)
    assert_streams_as_full_decode(pieces, full_decode(tokenizer, output_ids, skip_special_tokens))


@pytest.fixture(scope="session")
def partial_character_ids(tokenizer):
    """Tokens that hold part of a multi-byte character: the adversarial case for streaming."""
    ids = encode(tokenizer, "".join(TEXTS[2:]))
    return sorted({i for i in ids if REPLACEMENT_CHAR in full_decode(tokenizer, [i])})


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_partial_character_tokens_stream_as_full_decode(tokenizer, partial_character_ids, data):
    mixed_ids = partial_character_ids + encode(tokenizer, " a b")
    output_ids = data.draw(st.lists(st.sampled_from(mixed_ids), max_size=30))
    pieces = stream(tokenizer, [], output_ids)
    assert_streams_as_full_decode(pieces, full_decode(tokenizer, output_ids))


# --- sentencepiece with byte fallback ---


def sp_expected(tokenizer, prompt_ids, output_ids):
    """The output as it renders after the prompt (a standalone decode would strip its space)."""
    prompt_text = full_decode(tokenizer, prompt_ids)
    if not prompt_ids or prompt_text.endswith(REPLACEMENT_CHAR):
        return full_decode(tokenizer, output_ids)
    full_text = full_decode(tokenizer, list(prompt_ids) + list(output_ids))
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_streams_as_full_decode(sp_tokenizer, text):
    output_ids = encode(sp_tokenizer, text)
    pieces = stream(sp_tokenizer, [], output_ids)
    assert_streams_as_full_decode(pieces, full_decode(sp_tokenizer, output_ids))
    prompt_ids = encode(sp_tokenizer, "Hello world")
    pieces = stream(sp_tokenizer, prompt_ids, output_ids)
    assert_streams_as_full_decode(pieces, sp_expected(sp_tokenizer, prompt_ids, output_ids))


def test_sentencepiece_first_token_keeps_its_leading_space(sp_tokenizer):
    prompt_ids = encode(sp_tokenizer, "Hello")
    output_ids = encode(sp_tokenizer, "world")  # "\u2581world"
    assert full_decode(sp_tokenizer, output_ids) == "world"
    assert "".join(stream(sp_tokenizer, prompt_ids, output_ids)) == " world"
    # ... also when the prompt ends in special tokens that render as nothing.
    eos = sp_tokenizer.convert_tokens_to_ids("</s>")
    assert "".join(stream(sp_tokenizer, prompt_ids + [eos] * 6, output_ids)) == " world"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_skipped_special_keeps_next_space(sp_tokenizer, skip_special_tokens):
    im_end = sp_tokenizer.convert_tokens_to_ids("<|im_end|>")
    output_ids = encode(sp_tokenizer, "Hello") + [im_end] + encode(sp_tokenizer, "world \u00e9")
    pieces = stream(sp_tokenizer, [], output_ids, skip_special_tokens=skip_special_tokens)
    assert_streams_as_full_decode(
        pieces, full_decode(sp_tokenizer, output_ids, skip_special_tokens)
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=UNICODE_TEXT,
    split=st.integers(0, 60),
    chunk_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_sentencepiece_random_text_streams_as_full_decode(sp_tokenizer, text, split, chunk_sizes):
    ids = encode(sp_tokenizer, text)
    prompt_ids, output_ids = ids[:split], ids[split:]
    pieces = stream(sp_tokenizer, prompt_ids, output_ids, chunk_sizes)
    assert_streams_as_full_decode(pieces, sp_expected(sp_tokenizer, prompt_ids, output_ids))
