"""Word-level containment search: against a brute-force scan, and against the search it replaced
(tests/overlap_reference.py) on any input, hostile shapes included: same answers everywhere."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from overlap_reference import (
    reference_contained_in_any,
    reference_containing_any,
    reference_containment_pairs,
)

from w2s.overlap import contained_in_any, containing_any, containment_pairs, normalise


def brute_force(needles: list[str], haystacks: list[str]) -> list[tuple[int, int]]:
    return sorted(
        (i, j)
        for i, needle in enumerate(needles)
        for j, haystack in enumerate(haystacks)
        if needle.split() and normalise(needle) in normalise(haystack)
    )


def assert_same_as_reference(needles: list[str], haystacks: list[str]) -> None:
    """Every public answer equals the replaced search's, both ways round."""
    assert containment_pairs(needles, haystacks) == reference_containment_pairs(needles, haystacks)
    assert contained_in_any(needles, haystacks) == reference_contained_in_any(needles, haystacks)
    assert containing_any(haystacks, needles) == reference_containing_any(haystacks, needles)
    assert contained_in_any(haystacks, needles) == reference_contained_in_any(haystacks, needles)
    assert containing_any(needles, haystacks) == reference_containing_any(needles, haystacks)


def test_matches_brute_force_on_random_phrases() -> None:
    rng = random.Random(0)
    vocabulary = ["the", "film", "Great", "great", "a", "dull", "plot", "it", "'s", "goodness", "good"]
    haystacks = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    needles = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 4))) for _ in range(200)]
    needles += ["", "   ", haystacks[3], f"  {haystacks[4].upper()}  "]
    assert containment_pairs(needles, haystacks) == brute_force(needles, haystacks)
    assert_same_as_reference(needles, haystacks)


def test_whole_words_only_and_case_folded() -> None:
    found = contained_in_any(["good", "GOOD film", "od fi"], ["goodness", "a good film"])
    assert found == [True, True, False]
    assert contained_in_any(["good"], ["goodness"]) == [False]
    assert containing_any(["a good film", "goodness"], ["good film"]) == [True, False]
    assert contained_in_any(["", "film"], ["film"]) == [False, True]  # a blank text is in nothing


# Words chosen to collide: case folding that changes length ("ß" → "ss", "ﬁ" → "fi", "İ"), the
# three sigmas, prefixes of one another ("good" / "goodness"), punctuation glued to words; and
# whitespace of several kinds, which both searches must treat as word breaks alike.
WORDS = ["a", "A", "good", "goodness", "film", "'s", "x,"]
WORDS += ["ss", "ß", "SS", "ﬁ", "fi", "İ", "i̇", "Σ", "σ", "ς"]
SPACES = [" ", "  ", "\t", "\n", "\u00a0", "\u2003", "\x1c"]


@st.composite
def texts_from(draw: st.DrawFn, words: st.SearchStrategy[str], max_words: int = 8) -> str:
    picked = draw(st.lists(words, max_size=max_words))
    gaps = draw(st.lists(st.sampled_from(SPACES), min_size=len(picked) + 1, max_size=len(picked) + 1))
    return "".join(gap + word for gap, word in zip(gaps, [*picked, ""], strict=True))


@st.composite
def needles_and_haystacks(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """Haystacks of colliding words (or any text), and needles that are often runs of their words,
    whole haystacks re-spaced or re-cased, repeats, and blanks."""
    words = st.sampled_from(WORDS) | st.text(min_size=1, max_size=3)
    haystacks = draw(st.lists(texts_from(words), max_size=8))
    needles = draw(st.lists(texts_from(words, max_words=4), max_size=8))
    for haystack in haystacks:
        split = haystack.split()
        start = draw(st.integers(0, len(split)))
        end = draw(st.integers(start, len(split)))
        run = " ".join(split[start:end])
        needles.append(draw(st.sampled_from([run, run.upper(), f"\t{run} ", haystack])))
    return draw(st.permutations(needles)), haystacks


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(needles_and_haystacks())
def test_same_answers_as_the_replaced_search(case: tuple[list[str], list[str]]) -> None:
    needles, haystacks = case
    assert_same_as_reference(needles, haystacks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=10), st.lists(st.text(max_size=30), max_size=10))
def test_same_answers_on_any_text(needles: list[str], haystacks: list[str]) -> None:
    assert_same_as_reference(needles, haystacks)


def test_same_answers_on_hostile_shapes() -> None:
    """The shapes an upload can take to defeat a search: sized so the replaced one still finishes."""
    longest = "incomprehensibilities"
    shared_longest = [f"{longest} film {i % 300} {'again' if i % 3 else ''}" for i in range(900)]
    nested = ["w " * n for n in range(300)]  # every row inside every longer one
    repeated = ["the same review"] * 300 + ["THE  same\treview"] * 5
    rng = random.Random(1)
    long_text = " ".join(rng.choice(["a", "b", "ab", "ß", "ss"]) for _ in range(20_000))
    runs = [" ".join(long_text.split()[i : i + rng.randint(1, 12)]) for i in range(0, 20_000, 50)]
    cases = [
        (shared_longest[1::2], shared_longest[::2]),
        (nested[::2], nested[1::2]),
        (nested[1::2], nested[::2]),
        (repeated, repeated),
        ([*runs, "", "  ", "b a b a b a"], [long_text]),
        ([long_text], [*runs, long_text.upper()]),
        (["", " ", "\n"], ["", "a"]),
        ([], ["a"]),
        (["a"], []),
    ]
    for needles, haystacks in cases:
        assert_same_as_reference(needles, haystacks)
