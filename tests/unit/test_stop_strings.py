"""Stop strings on streamed text: never partly emitted, found across chunks, chunking-proof."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagewire.tokenizer.stop_strings import StopStringMatcher


def reference_stop(text, stop, include_stop_str_in_output=False):
    """Checks after every character; of the stop strings ending first, the longest wins."""
    for end in range(1, len(text) + 1):
        matches = [stop_str for stop_str in stop if text[:end].endswith(stop_str)]
        if matches:
            start = end - max(map(len, matches))
            return text[: end if include_stop_str_in_output else start], text[start:end]
    return text, None


def longest_held_suffix(text, stop):
    """The longest suffix of text that is a proper prefix of some stop string."""
    for size in range(min(len(text), max((len(s) for s in stop), default=0)), 0, -1):
        if any(stop_str.startswith(text[-size:]) for stop_str in stop):
            return text[-size:]
    return ""


def run(stop, chunks, include_stop_str_in_output=False):
    """Feeds chunks until a stop; returns (emitted pieces, stopped, matched stop string)."""
    matcher = StopStringMatcher(stop, include_stop_str_in_output)
    pieces = []
    for chunk in chunks:
        piece, stopped = matcher.feed(chunk)
        pieces.append(piece)
        if stopped:
            assert matcher.stopped
            return pieces, True, matcher.matched_stop
    pieces.append(matcher.flush())
    return pieces, False, matcher.matched_stop


def test_stop_string_in_one_chunk():
    assert run(["STOP"], ["hello STOP world"]) == (["hello "], True, "STOP")


def test_stop_string_split_across_chunks_is_never_partly_emitted():
    pieces, stopped, _ = run(["</answer>"], ["42 </", "ans", "wer> junk"])
    assert pieces == ["42 ", "", ""]
    assert stopped


def test_stop_string_split_into_single_characters():
    pieces, stopped, _ = run(["abc"], list("xxabcyy"))
    assert "".join(pieces) == "xx"
    assert stopped


def test_stop_string_at_start():
    assert run(["Hi"], ["Hi there"]) == ([""], True, "Hi")
    assert run(["Hi"], ["H", "i there"]) == (["", ""], True, "Hi")


def test_include_stop_str_in_output():
    assert run(["STOP"], ["a ST", "OP b"], include_stop_str_in_output=True) == (
        ["a ", "STOP"],
        True,
        "STOP",
    )


def test_false_start_is_released_when_it_stops_matching():
    matcher = StopStringMatcher(["abcd"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("c") == ("", False)
    assert matcher.feed("x") == ("abcx", False)


def test_overlapping_false_start_still_finds_the_later_match():
    # "aaa" fails "aac" at its third character, yet its tail "aa" can still begin a match.
    assert run(["aac"], ["aa", "b aa", "a", "c"]) == (["", "aab ", "a", ""], True, "aac")
    assert run(["aac"], list("aaac")) == (["", "", "a", ""], True, "aac")


def test_earliest_ending_stop_string_wins():
    # Char by char, "bc" completes before "abcd" could: chunking must not change that.
    assert run(["abcd", "bc"], ["abcd"]) == (["a"], True, "bc")
    assert run(["abcd", "bc"], list("abcd"))[0:2] == (["", "", "a"], True)


def test_longest_stop_string_wins_among_those_ending_together():
    assert run(["c", "abc", "bc"], ["xabc"]) == (["x"], True, "abc")


def test_no_stop_strings_pass_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_flush_releases_held_back_text():
    matcher = StopStringMatcher(["<|end|>", "\n\n"])
    assert matcher.feed("done <|en") == ("done ", False)
    assert matcher.feed("\n") == ("<|en", False)
    assert matcher.flush() == "\n"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_unicode_stop_strings():
    assert run(["\U0001f600\u4e16"], ["ok \U0001f600", "\u4e16 rest"]) == (
        ["ok ", ""],
        True,
        "\U0001f600\u4e16",
    )


def test_feed_after_stop_is_refused():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == ("a", True)
    with pytest.raises(AssertionError):
        matcher.feed("more")
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_many_stop_strings_and_long_output_stay_linear():
    rng = random.Random(0)
    # Near misses: each stop string runs deep into the text's alphabet, then needs an "x".
    stop = ["".join(rng.choices("abcd", k=rng.randint(3, 12))) + "x" for _ in range(10_000)]
    stop.append("THE END")
    text = "".join(rng.choices("abcd ", k=50_000)) + "THE END and more"
    started = time.perf_counter()
    pieces, stopped, matched_stop = run(stop, [text[i : i + 3] for i in range(0, len(text), 3)])
    assert time.perf_counter() - started < 3.0
    assert (stopped, matched_stop) == (True, "THE END")
    assert "".join(pieces) == text[: text.index("THE END")]


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    include_stop_str_in_output=st.booleans(),
)
def test_random_streams_match_checking_after_every_character(
    text, stop, cuts, include_stop_str_in_output
):
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    chunks = [text[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    expected_text, expected_stop = reference_stop(text, stop, include_stop_str_in_output)
    pieces, stopped, matched_stop = run(stop, chunks, include_stop_str_in_output)
    assert "".join(pieces) == expected_text
    assert stopped == (expected_stop is not None)
    assert matched_stop == expected_stop


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.text(alphabet="abc ", max_size=5), max_size=10),
    stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=1, max_size=4),
)
def test_held_back_text_is_exactly_the_longest_possible_stop_prefix(chunks, stop):
    matcher = StopStringMatcher(stop)
    fed = emitted = ""
    for chunk in chunks:
        piece, stopped = matcher.feed(chunk)
        fed, emitted = fed + chunk, emitted + piece
        if stopped:
            break
        assert fed == emitted + longest_held_suffix(fed, stop)
