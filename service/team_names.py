"""What a team may be called, and when two names are the same name.

Team names appear side by side in every administrator's listing (``w2s-service teams``, the audit
log, ``/v1/admin/teams``) and are how commands find a team, so no two may look alike: a name is
NFKC-normalised (full-width ``ａｌｐｈａ`` is ``alpha``) and stripped, then limited to ASCII letters,
digits, ``-``, ``_`` and ``.`` (1 to 64, starting with a letter or digit). That rules out look-alike
letters from other scripts (Cyrillic ``а`` in ``аlpha``), spaces, slashes and invisible characters.
Two names are the same name when they agree ignoring case: ``teams.name_key`` holds the case-folded
form under a unique index, so the database refuses the second of two racing creations.
"""

from __future__ import annotations

import re
import unicodedata

from service.errors import InvalidInput
from w2s.safe_text import describe_character

TEAM_NAME_MAX = 64
ALLOWED = "ASCII letters, digits, '-', '_' and '.'"
_ALLOWED_CHARACTER = re.compile(r"[A-Za-z0-9._-]")


def normalise(name: str) -> str:
    return unicodedata.normalize("NFKC", name).strip()


def team_name_key(name: str) -> str:
    """The form two names are compared in: normalised and case-folded (``Alpha`` and ``alpha``
    share one). Any text has one, valid or not: commands look teams up by it."""
    return normalise(name).casefold()


def check_team_name(name: str) -> str:
    """The name as it is stored (NFKC-normalised, stripped), or InvalidInput naming the first
    character or rule it breaks and the fix."""
    normal = normalise(name)
    if not normal:
        raise InvalidInput(f"team name is empty; give 1 to {TEAM_NAME_MAX} of {ALLOWED}")
    for position, char in enumerate(normal):
        if _ALLOWED_CHARACTER.fullmatch(char):
            continue
        if char.isspace():
            why = "spaces are not allowed: use '-' or '_' between words"
        elif char.isalpha() or char.isdigit():
            why = "letters outside ASCII are not allowed: some pass for ASCII ones (Cyrillic 'а', Latin 'a')"
        elif unicodedata.category(char).startswith(("C", "Z")):
            why = "control and invisible characters are not allowed"
        else:
            why = "it is not among the characters a team name may hold"
        raise InvalidInput(
            f"team name {normal!r} holds {describe_character(char)} at position {position}: "
            f"{why}; team names use only {ALLOWED}"
        )
    if len(normal) > TEAM_NAME_MAX:
        raise InvalidInput(f"team name is {len(normal)} characters long; at most {TEAM_NAME_MAX}")
    if not normal[0].isalnum():
        raise InvalidInput(f"team name {normal!r} must start with a letter or digit, not {normal[0]!r}")
    return normal
