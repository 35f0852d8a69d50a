"""The word-containment search as it was before issue 28 (item 6), kept as the slow reference that
tests/test_overlap.py checks w2s.overlap against and bench/overlap_scale.py times.

It indexes each needle under its longest word and tests every needle sharing an anchor word of a
haystack with one substring search: exact, but quadratic when many rows share their longest word.
Its results define what "contained" means; w2s.overlap must give the same answers on every input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from w2s.overlap import normalise


def reference_containment_pairs(needles: Sequence[str], haystacks: Sequence[str]) -> list[tuple[int, int]]:
    """Every ``(needle index, haystack index)`` where the needle's words appear inside the haystack."""
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


def reference_contained_in_any(needles: Sequence[str], haystacks: Sequence[str]) -> list[bool]:
    """For each needle: does it appear inside any haystack?"""
    hit = [False] * len(needles)
    for n_index, _ in reference_containment_pairs(needles, haystacks):
        hit[n_index] = True
    return hit


def reference_containing_any(haystacks: Sequence[str], needles: Sequence[str]) -> list[bool]:
    """For each haystack: does any needle appear inside it?"""
    hit = [False] * len(haystacks)
    for _, h_index in reference_containment_pairs(needles, haystacks):
        hit[h_index] = True
    return hit
