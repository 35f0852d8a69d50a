"""Find texts that appear verbatim inside other texts, so no model is tested or labelled on what it saw.

SST-2's train split is phrases cut from the same sentences: a short phrase of half B can sit, word
for word, inside a sentence of half A, so the weak model would label text it was trained on. The
same happens, more rarely, with duplicated rows in any data set.

Containment is judged on words: both texts are case-folded and split on whitespace, and the needle
must appear as a run of whole words in the haystack ("good" is inside "a good film", not inside
"goodness"). Identical texts count as contained; a needle without any word is inside nothing.

The search has two steps, both exact and linear in the size of the input, whatever the texts share.

1. A filter on runs of three words (hashed, compared by sorting): a needle inside a haystack has
   every one of its runs in that haystack, so a needle with a run that no haystack has is inside
   nothing; and a haystack without the rarest run of any needle left (or the first word of one
   under three words) holds none. Real texts rarely pass unless they are contained; a hash
   collision only keeps a text for step 2.
2. An Aho-Corasick automaton whose alphabet is words, over the needles left: a trie of their words
   with, for every node, a failure link to the longest proper suffix of its words that is also a
   node. Reading a haystack left keeps the automaton at the longest needle prefix ending at each
   word; a needle occurs in the haystack exactly when its node is a state visited or a failure-link
   ancestor of one. Building costs the needles' words, reading the haystacks' words (each failure
   step undoes one earlier advance).

So a hostile upload of rows that all share their longest word, or that all contain one another,
costs what any upload of its size costs (the search it replaced compared such rows pairwise). Only
:func:`containment_pairs` also costs its output, which can be every needle times every haystack.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

ROOT = 0  # the trie node of no words


def normalise(text: str) -> str:
    """Case-folded words joined by single spaces, padded with a space on each side (word bounds).

    A needle is contained in a haystack exactly when its normalised text is a substring of the
    haystack's (the definition the automaton implements, word by word)."""
    return " " + " ".join(text.casefold().split()) + " "


def _words(text: str) -> list[str]:
    """The words ``normalise`` joins: the spaces it adds separate words, so matching normalised
    substrings is matching runs of whole words."""
    return text.casefold().split()


class _NeedleAutomaton:
    """Aho-Corasick over words for a list of needles (see the module docstring).

    Nodes are numbered in order of depth (the trie is built one word position at a time), so a
    node's failure link and parent always have smaller numbers than the node itself.
    """

    def __init__(self, needles: Sequence[str]) -> None:
        # goto[word][node] = the child of ``node`` along ``word``: a table per distinct word, so
        # reading a haystack word costs one lookup for the word and one per node tried. About 100
        # bytes per node in all: the filter (_candidates) keeps the needles few.
        self.goto: dict[str, dict[int, int]] = {}
        self.fail: list[int] = [ROOT]
        self.needle_node: list[int] = [ROOT] * len(needles)  # ROOT: a blank needle, matched by nothing
        tables = [[self._table(word) for word in _words(text)] for text in needles]
        at = [ROOT] * len(needles)
        active = [index for index, words in enumerate(tables) if words]
        depth = 0
        while active:
            still: list[int] = []
            for index in active:
                table = tables[index][depth]
                node = table.get(at[index])
                if node is None:
                    node = table[at[index]] = len(self.fail)
                    self.fail.append(self._fail_of(at[index], table))
                at[index] = node
                if depth + 1 < len(tables[index]):
                    still.append(index)
                else:
                    self.needle_node[index] = node
            active = still
            depth += 1

    def _table(self, word: str) -> dict[int, int]:
        table = self.goto.get(word)
        if table is None:
            table = self.goto[word] = {}
        return table

    def _fail_of(self, parent: int, table: dict[int, int]) -> int:
        """The failure link of the new child of ``parent`` along the word of ``table``: the deepest
        node reached by that word from a failure-link ancestor of ``parent``. Every node it looks
        at is shallower than the new one, so already built."""
        if parent == ROOT:
            return ROOT
        node = self.fail[parent]
        while True:
            child = table.get(node)
            if child is not None:
                return child
            if node == ROOT:
                return ROOT
            node = self.fail[node]

    def states(self, haystack: str) -> list[int]:
        """The node after each word of ``haystack``: the longest needle prefix ending at that word."""
        goto, fail = self.goto, self.fail
        state = ROOT
        visited = []
        for word in _words(haystack):
            table = goto.get(word)
            if table is None:  # a word of no needle: no needle prefix ends here
                state = ROOT
            else:
                while (child := table.get(state)) is None and state != ROOT:
                    state = fail[state]
                state = ROOT if child is None else child
            visited.append(state)
        return visited

    def needles_ending_at(self) -> list[bool]:
        """Per node: does some needle end at it or at one of its failure-link ancestors (so a
        haystack that visits the node contains that needle)?"""
        ends = [False] * len(self.fail)
        for node in self.needle_node:
            ends[node] = True
        ends[ROOT] = False  # blank needles
        for node in range(1, len(self.fail)):  # ancestors first: they have smaller numbers
            ends[node] = ends[node] or ends[self.fail[node]]
        return ends


RUN = 3  # words in the runs the filter compares


def _run_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The hash of every run of ``RUN`` consecutive words of every text, text after text, and how
    many runs each text has (none below ``RUN`` words)."""
    hashes = array("q")
    counts = array("q")
    for text in texts:
        words = _words(text)
        before = len(hashes)
        hashes.extend(map(hash, zip(*(words[start:] for start in range(RUN)), strict=False)))
        counts.append(len(hashes) - before)
    return np.frombuffer(hashes, dtype=np.int64), np.frombuffer(counts, dtype=np.int64)


def _occurrences(values: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """Per value: how often it is in ``sorted_pool``. (The values are looked up in sorted order: a
    binary search per value in random order misses the cache at every step, ten times slower.)"""
    order = np.argsort(values)
    in_order = values[order]
    counts = np.empty(len(values), dtype=np.int64)
    counts[order] = np.searchsorted(sorted_pool, in_order, "right") - np.searchsorted(sorted_pool, in_order)
    return counts


def _per_text(flags: np.ndarray, runs_per_text: np.ndarray) -> np.ndarray:
    """How many of each text's runs are flagged (``flags`` holds the runs text after text)."""
    flagged_before = np.concatenate(([0], np.cumsum(flags)))
    ends = np.cumsum(runs_per_text)
    return flagged_before[ends] - flagged_before[ends - runs_per_text]


def _candidates(needles: Sequence[str], haystacks: Sequence[str]) -> tuple[list[int], list[int]]:
    """(the needles that may appear inside some haystack, the haystacks that may hold one of them),
    as indices; no other needle appears anywhere, no other haystack holds one of them. A needle of
    ``RUN`` words or more inside a haystack has each of its runs there, so every run of it must be
    among the haystacks' runs, and a haystack that holds it holds its rarest run; a needle of fewer
    words has its first word there. Hash collisions only keep more texts for the exact search."""
    haystack_runs, runs_per_haystack = _run_hashes(haystacks)
    needle_runs, runs_per_needle = _run_hashes(needles)
    seen = _occurrences(needle_runs, np.sort(haystack_runs))  # per needle run: in how many places
    needle_kept = _per_text(seen == 0, runs_per_needle) == 0  # needles under RUN words pass here

    # The haystacks that hold the rarest run of a kept needle: a kept needle's runs, ordered by
    # needle then by how often they were seen; the first of each needle's is its rarest.
    of_kept = np.repeat(needle_kept, runs_per_needle)
    owner = np.repeat(np.arange(len(needles)), runs_per_needle)[of_kept]
    order = np.lexsort((seen[of_kept], owner))
    firsts = order[np.flatnonzero(np.diff(owner[order], prepend=-1))]
    rarest_runs = np.sort(needle_runs[of_kept][firsts])
    haystack_kept = _per_text(_occurrences(haystack_runs, rarest_runs) > 0, runs_per_haystack) > 0

    # And those that hold the first word of a kept needle too short to have a run.
    needle_indices = np.flatnonzero(needle_kept).tolist()
    first_words = set()
    for index in needle_indices:
        words = _words(needles[index])
        if 0 < len(words) < RUN:
            first_words.add(words[0])
    if first_words:
        for index in np.flatnonzero(~haystack_kept).tolist():
            haystack_kept[index] = not first_words.isdisjoint(_words(haystacks[index]))
    return needle_indices, np.flatnonzero(haystack_kept).tolist()


def contained_in_any(needles: Sequence[str], haystacks: Sequence[str]) -> list[bool]:
    """For each needle: does it appear inside any haystack?"""
    needle_indices, haystack_indices = _candidates(needles, haystacks)
    automaton = _NeedleAutomaton([needles[index] for index in needle_indices])
    reached = bytearray(len(automaton.fail))
    for index in haystack_indices:
        for state in automaton.states(haystacks[index]):
            reached[state] = 1
    # A visited node's needle occurs, and so does every needle at its failure-link ancestors
    # (suffixes of it); descendants first, so one pass carries the marks to the root.
    for node in range(len(reached) - 1, 0, -1):
        if reached[node]:
            reached[automaton.fail[node]] = 1
    found = [False] * len(needles)
    for index, node in zip(needle_indices, automaton.needle_node, strict=True):
        found[index] = node != ROOT and bool(reached[node])
    return found


def containing_any(haystacks: Sequence[str], needles: Sequence[str]) -> list[bool]:
    """For each haystack: does any needle appear inside it?"""
    needle_indices, haystack_indices = _candidates(needles, haystacks)
    automaton = _NeedleAutomaton([needles[index] for index in needle_indices])
    ends = automaton.needles_ending_at()
    found = [False] * len(haystacks)
    for index in haystack_indices:
        found[index] = any(ends[state] for state in automaton.states(haystacks[index]))
    return found


def containment_pairs(needles: Sequence[str], haystacks: Sequence[str]) -> list[tuple[int, int]]:
    """Every ``(needle index, haystack index)`` where the needle's words appear inside the haystack,
    sorted. Blank needles are never contained in anything.

    Its output can hold every needle times every haystack; the data cleaning uses the two functions
    above, which cost only the input."""
    needle_indices, haystack_indices = _candidates(needles, haystacks)
    automaton = _NeedleAutomaton([needles[index] for index in needle_indices])
    at_node: dict[int, list[int]] = {}
    for index, node in zip(needle_indices, automaton.needle_node, strict=True):
        if node != ROOT:
            at_node.setdefault(node, []).append(index)
    # The nearest node at or above each node (by failure links) where a needle ends: walking these
    # links from a visited node lists the needles found there, skipping nodes without any.
    nearest: list[int] = [ROOT] * len(automaton.fail)
    for node in range(1, len(nearest)):
        nearest[node] = node if node in at_node else nearest[automaton.fail[node]]
    pairs: list[tuple[int, int]] = []
    for h_index in haystack_indices:
        found: set[int] = set()
        for state in automaton.states(haystacks[h_index]):
            node = nearest[state]
            while node != ROOT and node not in found:
                found.add(node)
                node = nearest[automaton.fail[node]]
        pairs.extend((n_index, h_index) for node in found for n_index in at_node[node])
    return sorted(pairs)
