"""Word-level containment search against a brute-force scan."""

from __future__ import annotations

import random

from w2s.overlap import contained_in_any, containing_any, containment_pairs, normalise


def brute_force(needles: list[str], haystacks: list[str]) -> list[tuple[int, int]]:
    return sorted(
        (i, j)
        for i, needle in enumerate(needles)
        for j, haystack in enumerate(haystacks)
        if needle.split() and normalise(needle) in normalise(haystack)
    )


def test_matches_brute_force_on_random_phrases() -> None:
    rng = random.Random(0)
    vocabulary = ["the", "film", "Great", "great", "a", "dull", "plot", "it", "'s", "goodness", "good"]
    haystacks = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    needles = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 4))) for _ in range(200)]
    needles += ["", "   ", haystacks[3], f"  {haystacks[4].upper()}  "]
    assert containment_pairs(needles, haystacks) == brute_force(needles, haystacks)


def test_whole_words_only_and_case_folded() -> None:
    found = contained_in_any(["good", "GOOD film", "od fi"], ["goodness", "a good film"])
    assert found == [True, True, False]
    assert contained_in_any(["good"], ["goodness"]) == [False]
    assert containing_any(["a good film", "goodness"], ["good film"]) == [True, False]
    assert contained_in_any(["", "film"], ["film"]) == [False, True]  # a blank text is in nothing
