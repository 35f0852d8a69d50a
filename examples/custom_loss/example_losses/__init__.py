"""An example student loss for w2s-service: cross entropy with the classes balanced over each batch.

Registered as ``balanced_xent``; a job names it like a built-in loss::

    "losses": ["xent", "balanced_xent", {"name": "balanced_xent", "strength": 0.5}]

It shows the contract every loss keeps (w2s.losses): a frozen dataclass whose typed fields are its
parameters, checked in ``__post_init__``; ``__call__(logits, labels, step_frac)`` returning the
batch mean in float32; and, because its class weights are statistics of the whole batch, a
``batch_statistics`` method, so that splitting a batch into minibatches (gradient accumulation)
computes exactly what the whole batch does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from w2s.losses import register_loss


@register_loss("balanced_xent")
@dataclass(frozen=True)
class BalancedXent:
    """Cross entropy with each class weighted by the inverse of its share of the batch's labels."""

    strength: float = 1.0
    """0: plain cross entropy; 1: each class weighted by 1 / (2 x its share of the label mass)."""

    def __post_init__(self) -> None:
        # A bad parameter is refused when the job is submitted, naming the field.
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            raise ValueError(f"strength must be in [0, 1], got {self.strength!r}")

    def batch_statistics(
        self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float
    ) -> dict[str, torch.Tensor]:
        """The class weights, from the label mass of the whole optimizer batch: the trainer computes
        them once per batch and hands them to every minibatch's call."""
        share = labels.float().mean(dim=0).clamp_min(1e-6)  # (2,) the batch's label mass per class
        return {"class_weight": (0.5 / share) ** self.strength}

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        step_frac: float,
        stats: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if stats is None:  # called on the whole batch
            stats = self.batch_statistics(logits, labels, step_frac)
        # float32 whatever the autocast precision, so that bf16 logits keep the softmax exact.
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, 2)
        per_example = -(labels.float() * stats["class_weight"] * log_probs).sum(dim=-1)  # (B,)
        return per_example.mean()  # a mean of per-example terms: minibatches add up to the batch
