"""Resume checkpoints: a training stage interrupted (its worker lost, preempted, drained) goes on from
its last checkpoint instead of step 0, and ends exactly where an uninterrupted run would.

A checkpoint holds everything the rest of the run depends on: the trainable weights (all of them in
full mode; the head and adapters in LoRA and probe mode), the optimizer's, schedule's and gradient
scaler's state, every random generator the loop draws from (torch's on each device, Python's and
NumPy's global ones; the batch order is replayed from the stage's seed), the steps and examples done,
the early-stopping state (best loss and its weights) and a plug-in loss's own state if it keeps one
(``state_dict`` / ``load_state_dict``; the built-in losses keep none: whole-batch statistics are
computed afresh each step). On the CPU in float32 a resumed run's weights and metrics are identical to
an uninterrupted run's (tests/test_resume.py); on a GPU, within the noise of its non-deterministic
kernels unless ``deterministic`` is set.

Checkpoints are written every ``checkpoint_every_steps`` steps or ``checkpoint_every_s`` seconds
(settings W2S_CHECKPOINT_EVERY_STEPS / W2S_CHECKPOINT_EVERY_S), and at once when the progress
callback answers :data:`YIELD` (a preemption, a drain): then training raises :class:`Yielded`. Only
the last checkpoint of a stage key is kept (``resume/<key>.pt`` in the artifact store), and it is
removed once the stage's result is stored. When checkpoints are taken does not change the result,
so the policy is not part of the stage key.
"""

from __future__ import annotations

# Imports nothing heavy at module level: the worker's control processes read YIELD and the event
# types without loading torch.
import contextlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

# A progress callback's answer meaning: save a checkpoint now and stop; the stage resumes later.
YIELD = "yield"
# Bumped when what a checkpoint holds changes: an older one is ignored (the stage starts over).
FORMAT = 1
RESUME = "resume"


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a training stage writes its resume checkpoint: every ``every_steps`` optimizer steps
    and/or every ``every_s`` seconds of training (0 turns either off; both 0: only when asked to yield)."""

    every_steps: int = 0
    every_s: float = 600.0

    def due(self, steps_since: int, seconds_since: float) -> bool:
        return (self.every_steps > 0 and steps_since >= self.every_steps) or (
            self.every_s > 0 and seconds_since >= self.every_s
        )

    @classmethod
    def from_settings(cls) -> CheckpointPolicy:
        from w2s.settings import library_settings

        settings = library_settings()
        return cls(settings.checkpoint_every_steps, settings.checkpoint_every_s)


@dataclass(frozen=True)
class CheckpointSaved:
    """What the progress callback sees after a checkpoint is written."""

    step: int
    total_steps: int
    seconds: float  # writing it took
    size_bytes: int
    phase: str = "checkpoint"


@dataclass(frozen=True)
class Resumed:
    """What the progress callback sees when training goes on from a checkpoint."""

    step: int
    total_steps: int
    phase: str = "resumed"


class Yielded(Exception):
    """Training stopped when asked to yield, after writing a checkpoint at ``step`` (0: before
    training started, nothing to keep)."""

    def __init__(self, step: int, total_steps: int):
        super().__init__(f"yielded at step {step} of {total_steps}")
        self.step, self.total_steps = step, total_steps

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the pipe from a stage's own process
        return (Yielded, (self.step, self.total_steps))


class Checkpoints(Protocol):
    """Where one stage's resume checkpoint lives."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> int: ...  # bytes written

    def clear(self) -> None: ...


class StoreCheckpoints:
    """A stage key's last checkpoint in the artifact store (``files/resume/<key>.pt``), written through
    a local temporary file (a full model's optimizer state need not fit in memory twice)."""

    def __init__(self, store: Any, key: str):
        self.store, self.key = store, key

    @property
    def name(self) -> str:
        return f"{self.key}.pt"

    def load(self) -> dict[str, Any] | None:
        import torch

        with tempfile.TemporaryDirectory(prefix="w2s-resume-") as folder:
            local = os.path.join(folder, self.name)
            if not self.store.get_named_file(RESUME, self.name, local):
                return None
            try:
                state = torch.load(local, map_location="cpu", weights_only=True)
            except Exception as error:  # a damaged or foreign file: start over rather than fail
                logger.warning("resume checkpoint of %s unreadable, starting over: %s", self.key[:16], error)
                return None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            logger.info("resume checkpoint of %s is of another format; starting over", self.key[:16])
            return None
        return state

    def save(self, state: dict[str, Any]) -> int:
        import torch

        with tempfile.TemporaryDirectory(prefix="w2s-resume-") as folder:
            local = os.path.join(folder, self.name)
            torch.save(state, local)
            size = os.path.getsize(local)
            self.store.put_named_file(RESUME, self.name, local)
        return size

    def clear(self) -> None:
        with contextlib.suppress(Exception):  # a leftover costs storage only; the next run overwrites it
            self.store.delete_named_file(RESUME, self.name)


def rng_states() -> dict[str, Any]:
    """Every random generator a training step may draw from, in a form ``torch.load(weights_only=True)``
    reads back (tensors, lists and numbers only)."""
    import torch

    kind, keys, position, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class CheckpointClock:
    """Counts steps and training seconds since the last checkpoint, against a policy."""

    def __init__(self, policy: CheckpointPolicy, step: int):
        self.policy, self.step, self.at = policy, step, time.monotonic()

    def due(self, step: int) -> bool:
        return self.policy.due(step - self.step, time.monotonic() - self.at)

    def reset(self, step: int) -> None:
        self.step, self.at = step, time.monotonic()
