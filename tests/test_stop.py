"""Stop strings on streamed text: however the text is cut into deltas, the output equals a
plain search of the whole text for the earliest stop string."""
import itertools
import random

import pytest

from router.stop import StopStringMatcher


def reference(text: str, stop: tuple[str, ...], include: bool) -> tuple[str, bool]:
    """Non-streaming: cut at the earliest occurrence of any stop string (the shortest on ties)."""
    hits = [(text.find(s), len(s), s) for s in stop if s in text]
    if not hits:
        return text, False
    start, _, s = min(hits)
    return text[:start] + (s if include else ""), True


def stream(deltas: list[str], stop: tuple[str, ...], include: bool) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop, include)
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), matcher.stopped


def all_splits(text: str):
    """Every way of cutting text into non-empty deltas (2 ** (len - 1) of them: keep texts short)."""
    for cuts in itertools.product([False, True], repeat=max(len(text) - 1, 0)):
        deltas, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                deltas.append(text[start:i])
                start = i
        deltas.append(text[start:])
        yield deltas


CASES = [
    ("hi world. x", ("world",)),
    ("hi. bye x", (".", "bye")),
    ("STOPhello", ("STOP",)),                   # stop string at the very start
    ("abcabcab", ("abcab", "cab")),             # overlapping stops; the earlier start wins
    ("abcd", ("abcd", "bc")),                   # a complete stop waits for an earlier, longer one
    ("abcx", ("abcd", "bc")),                   # ... which then fails to complete
    ("aaab", ("aab", "ab")),                    # self-overlapping prefixes
    ("xyzxyz", ("yzx", "zx", "xyzy")),
    ("no stop!", ("STOP", "\n\n")),
    ("tail: sto", ("stop",)),                   # held-back tail released by flush
    ("héllo→wörld", ("→w",)),                   # non-ASCII characters
    ("ab", ("ab", "abc")),                      # same start: the shortest wins
]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text, stop", CASES)
def test_every_split_matches_the_whole_text_search(text, stop, include):
    expected = reference(text, stop, include)
    for deltas in all_splits(text):
        assert stream(deltas, stop, include) == expected, deltas


def test_random_texts_and_splits_match_the_whole_text_search():
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab c"[: rng.randint(2, 4)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stop = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
        include = rng.random() < 0.5
        deltas, i = [], 0
        while i < len(text):
            n = rng.randint(0, 4)                   # empty deltas happen too (an incomplete UTF-8 token)
            deltas.append(text[i: i + n])
            i += n
        assert stream(deltas, stop, include) == reference(text, stop, include), (text, stop, deltas)


def test_possible_stop_start_is_held_back_then_released():
    matcher = StopStringMatcher(("</answer>",))
    assert matcher.feed("42 </ans") == ("42 ", False)
    assert matcher.feed("wer is") == ("</answer is", False)
    assert matcher.feed(" <") == (" ", False)
    assert matcher.flush() == "<"
    assert not matcher.stopped


def test_text_after_the_stop_is_discarded_and_the_stop_is_reported():
    matcher = StopStringMatcher(("\n\n", "END"), include_stop_str_in_output=True)
    assert matcher.feed("one\n") == ("one", False)
    assert matcher.feed("\ntwo END") == ("\n\n", True)
    assert matcher.matched_stop == "\n\n"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_at_the_very_start():
    matcher = StopStringMatcher(("<|end|>",))
    assert matcher.feed("<|end|>tail") == ("", True)


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher(())
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(("ok", ""))
