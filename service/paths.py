"""The one policy for the paths a request may name: model directories under ``W2S_MODEL_ROOTS``, data
files under the team's uploads and ``W2S_DATA_DIR``.

A path is resolved fully (symlinks included) and must lie under a root. A relative path is taken
against ``W2S_PATH_BASE`` (the checkout by default, so ``./models/x`` means its models/x), then
against each root in turn, never against a process's working directory, which differs between the
API, the workers and their hosts. The answer is the same whether or not the path exists, so a
refusal tells the caller nothing about the server's files.

A model is either a Hugging Face hub id (``name`` or ``org/name``) or a directory: a hub id that
names a directory under a root is that directory (roots are where administrators put models);
anything else with a path's shape must be under a root. A hub id is never looked up on the disk
outside the roots (``outside/tiny-gpt2-a`` in the working directory stays a hub id).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The hub's own shape of an id: a name, or an owner and a name; no "..", no leading "." or "~".
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


@dataclass(frozen=True)
class ModelRef:
    hub_id: str | None = None  # a hub model
    directory: Path | None = None  # a local model: resolved, under a root

    @property
    def value(self) -> str:
        """What the job stores and the workers load: the hub id, or the absolute directory."""
        return self.hub_id if self.hub_id is not None else str(self.directory)


def _roots(roots: Iterable[Path | str]) -> list[Path]:
    resolved = []
    for root in roots:
        try:
            resolved.append(Path(root).expanduser().resolve())
        except (OSError, RuntimeError, ValueError):  # an unusable root allows nothing
            continue
    return resolved


def resolve_under(path: str | Path, roots: Iterable[Path | str], base: Path | None = None) -> Path | None:
    """``path`` fully resolved if it lies under one of ``roots`` (relative: against ``base``, then each
    root in turn, never the working directory); None otherwise, whether or not it exists."""
    allowed = _roots(roots)
    try:
        given = Path(path).expanduser()  # "~" is a home directory; "~nobody" raises: refused
        bases = ([base] if base is not None else []) + allowed
        candidates = [given] if given.is_absolute() else [Path(b) / given for b in bases]
        for candidate in candidates:
            resolved = candidate.resolve()  # symlinks followed: a link that leads out is outside
            if any(resolved.is_relative_to(root) for root in allowed):
                return resolved
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop: not a usable path
        return None
    return None


def is_hub_id(model: str) -> bool:
    return bool(HUB_ID.match(model)) and ".." not in model


def model_reference(model: str, roots: Iterable[Path | str], base: Path | None = None) -> ModelRef | None:
    """What ``model`` names under the policy, or None when it is refused (a path outside the roots)."""
    roots = list(roots)
    if is_hub_id(model):
        local = resolve_under(model, roots, base)
        if local is not None and local.is_dir():
            return ModelRef(directory=local)
        return ModelRef(hub_id=model)
    local = resolve_under(model, roots, base)
    return ModelRef(directory=local) if local is not None else None
