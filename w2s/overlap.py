"""Find texts that appear verbatim inside other texts, so no model is tested or labelled on what it saw.

SST-2's train split is phrases cut from the same sentences: a short phrase of half B can sit, word
for word, inside a sentence of half A, so the weak model would label text it was trained on. The
same happens, more rarely, with duplicated rows in any data set.

Containment is judged on words: both texts are case-folded and split on whitespace, and the needle
must appear as a run of whole words in the haystack ("good" is inside "a good film", not inside
"goodness"). Identical texts count as contained.

The search indexes each needle under its longest word (long words are rare, so few haystacks share
it), collects for each haystack the needles whose anchor word it contains, and confirms each
candidate with one substring test. The cost grows with the total number of words, not with
needles x haystacks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def normalise(text: str) -> str:
    """Case-folded words joined by single spaces, padded with a space on each side (word bounds)."""
    return " " + " ".join(text.casefold().split()) + " "


def containment_pairs(needles: Sequence[str], haystacks: Sequence[str]) -> list[tuple[int, int]]:
    """Every ``(needle index, haystack index)`` where the needle's words appear inside the haystack.

    Needles without any word (blank text) are never contained in anything.
    """
    by_anchor: dict[str, list[int]] = defaultdict(list)
    normalised_needles = [normalise(text) for text in needles]
    for index, text in enumerate(normalised_needles):
        words = text.split()
        if words:
            # The longest word; ties go to the first, so the choice is deterministic.
            by_anchor[max(words, key=len)].append(index)
    pairs: list[tuple[int, int]] = []
    for h_index, raw in enumerate(haystacks):
        haystack = normalise(raw)
        candidates = [i for word in set(haystack.split()) for i in by_anchor.get(word, ())]
        pairs.extend((n_index, h_index) for n_index in candidates if normalised_needles[n_index] in haystack)
    return sorted(pairs)


def contained_in_any(needles: Sequence[str], haystacks: Sequence[str]) -> list[bool]:
    """For each needle: does it appear inside any haystack?"""
    hit = [False] * len(needles)
    for n_index, _ in containment_pairs(needles, haystacks):
        hit[n_index] = True
    return hit


def containing_any(haystacks: Sequence[str], needles: Sequence[str]) -> list[bool]:
    """For each haystack: does any needle appear inside it?"""
    hit = [False] * len(haystacks)
    for _, h_index in containment_pairs(needles, haystacks):
        hit[h_index] = True
    return hit
