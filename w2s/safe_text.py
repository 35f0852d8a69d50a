"""Characters a terminal or a reader cannot be trusted with, in one place: control characters (ESC
starts a terminal escape sequence, CR returns to the start of the line, LF starts a new one),
formatting characters (bidi overrides and isolates, zero-width spaces and joiners) and line or
paragraph separators. Names people give (jobs, sweeps, datasets, teams, keys) may not hold them
(``check_name``), and every command line escapes them in what it prints (``terminal_safe``), since
rows written before names were checked may still hold them.

Standard library only: the ``w2s`` library, the service and its clients all import it.
"""

from __future__ import annotations

import unicodedata

# Unicode general categories: Cc control (C0, DEL, C1), Cf format (bidi controls U+202A-U+202E and
# U+2066-U+2069, zero-width U+200B-U+200D, U+2060, U+FEFF, soft hyphen), Zl / Zp the line and
# paragraph separators, Cs a lone surrogate (which cannot even be stored as UTF-8).
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})

# Control characters have no Unicode name; these are the ones people meet.
CONTROL_NAMES = {
    0x00: "NUL",
    0x07: "BELL",
    0x08: "BACKSPACE",
    0x09: "TAB",
    0x0A: "LINE FEED",
    0x0B: "VERTICAL TAB",
    0x0C: "FORM FEED",
    0x0D: "CARRIAGE RETURN",
    0x1B: "ESCAPE",
    0x7F: "DELETE",
}


def is_unsafe(char: str) -> bool:
    """Whether one character is a control, formatting, separator or surrogate character."""
    return unicodedata.category(char) in UNSAFE_CATEGORIES


def unsafe_characters(text: str) -> list[tuple[int, str]]:
    """Each unsafe character of ``text`` with its position, in order."""
    if text.isprintable():  # the common case, in C: printable text holds none of them
        return []
    return [(index, char) for index, char in enumerate(text) if is_unsafe(char)]


def describe_character(char: str) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE``, ``U+001B ESCAPE``: a character as a person can read it."""
    code = ord(char)
    name = CONTROL_NAMES.get(code) or unicodedata.name(char, "")
    if not name:
        name = "a control character" if unicodedata.category(char) == "Cc" else "an unnamed character"
    return f"U+{code:04X} {name}"


def check_name(value: str, field: str = "name") -> str:
    """``value`` unchanged, or ValueError naming the first unsafe character, where it is, and the fix.
    Every schema field that holds a name people give runs through this (api/schemas.py)."""
    found = unsafe_characters(value)
    if not found:
        return value
    position, char = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise ValueError(
        f"{field} holds {describe_character(char)} at position {position}{more}: names may not hold "
        "control characters (escape, carriage return, line feed, tab), bidi overrides or isolates, "
        "zero-width or other invisible formatting characters; remove them"
    )


# The escapes people read at a glance; every other character by its code.
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_character(char: str) -> str:
    """The visible escape of one character, as Python writes it: ``\\n``, ``\\x1b``, ``\\u202e``,
    ``\\U000e0001``."""
    if char in SHORT_ESCAPES:
        return SHORT_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def terminal_safe(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` (or ``str(text)``) with every unsafe character written as a visible escape, so that
    what reaches a terminal is exactly what it shows: no colours, cursor moves, overwritten lines,
    reversed text or hidden characters. A line break in a value becomes ``\\n`` unless
    ``keep_newlines`` (a message of several lines of our own). Backslashes are left as they are
    (``\\x1b`` typed as four characters reads the same)."""
    text = text if isinstance(text, str) else str(text)
    if text.isprintable():
        return text
    return "".join(
        char if not is_unsafe(char) or (keep_newlines and char == "\n") else escape_character(char)
        for char in text
    )
