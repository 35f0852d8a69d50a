"""Losses of your own, as the tests install them: a module whose import registers a loss (for
W2S_LOSS_MODULES), an installed distribution's ``w2s.losses`` entry points (a ``.dist-info`` folder
on the path, as pip leaves one), and a registry as a fresh process has it."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from w2s import losses

EXAMPLE_PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "custom_loss"

SCALED_XENT = '''"""Losses of a researcher's own, for the tests."""

import dataclasses

import torch.nn.functional as F

from w2s.losses import register_loss


@register_loss("{name}")
@dataclasses.dataclass(frozen=True)
class ScaledXent:
    """Cross entropy times a constant (a plug-in for the tests)."""

    offset: float = 0.0

    def __call__(self, logits, labels, step_frac):
        return F.cross_entropy(logits.float(), labels.float()) * {scale} + self.offset
'''

UNDECORATED = '''import dataclasses

import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Halved:
    """Half the cross entropy (registered by its entry point's name)."""

    def __call__(self, logits, labels, step_frac):
        return F.cross_entropy(logits.float(), labels.float()) / 2
'''


def unique(prefix: str) -> str:
    """A module or loss name no other test uses: modules stay imported for the whole session."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write_loss_module(folder: Path, module: str, loss: str, scale: str = "1.0") -> Path:
    """``folder/module.py``, registering ``ScaledXent`` as ``loss`` when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(SCALED_XENT.format(name=loss, scale=scale))
    return path


def write_distribution(folder: Path, name: str, entry_points: dict[str, str]) -> Path:
    """An installed distribution's metadata in ``folder`` (what ``pip install`` writes), offering
    ``entry_points`` (name -> "module:Class" or "module") in the ``w2s.losses`` group."""
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{losses.ENTRY_POINT_GROUP}]\n{lines}")
    return info


def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss registry as a new process has it, until the test ends: the built-in losses, plug-ins
    not loaded yet (so the next lookup reads W2S_LOSS_MODULES and the entry points again)."""
    built_in = {name: cls for name, cls in losses._REGISTRY.items() if cls.__module__ == losses.__name__}
    monkeypatch.setattr(losses, "_REGISTRY", built_in)
    monkeypatch.setattr(losses, "_plugins_loaded", False)


def as_new_process(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Forget the plug-ins and their modules, as a process started afresh would not have them."""
    for module in modules:
        monkeypatch.delitem(sys.modules, module, raising=False)
    fresh_registry(monkeypatch)
