"""The training loop: length-bucketed batches, accumulation, schedule, autocast, evaluation.

``fit`` trains any module whose ``forward(**batch)`` returns (batch, 2) logits on any
:class:`TrainData` (tokenised texts, or cached features in probe mode), so full fine-tuning, LoRA
and probes share one loop.

Gradient accumulation computes what one pass over the whole batch would: each minibatch's loss is
weighted by its share of the batch, and a loss that uses statistics of the whole batch gets them from
a gradient-free pass over the batch first (see :mod:`w2s.losses`). So ``minibatch_size`` changes memory
and speed, never the result (up to float rounding).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from w2s.losses import Loss, batch_statistics, check_minibatch_invariance, minibatch_loss
from w2s.resume import (
    FORMAT,
    YIELD,
    CheckpointClock,
    CheckpointPolicy,
    Checkpoints,
    CheckpointSaved,
    Resumed,
    Yielded,
    restore_rng_states,
    rng_states,
)
from w2s.spec import TrainConfig

logger = logging.getLogger(__name__)

# Chunks of this many batches are sorted by length before batching: batches hold texts of similar
# length (little padding) while the order of batches stays random.
BUCKET_BATCHES = 64


@dataclass(frozen=True)
class Progress:
    """What the progress callback sees after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    train_accuracy: float
    lr: float
    eval_accuracy: float | None = None
    phase: str = "train"


@dataclass(frozen=True)
class ExtractionProgress:
    """What the progress callback sees while probe features are computed (before training starts):
    rows of ``split`` done out of ``total``, and the rate so far."""

    split: str
    done: int
    total: int
    rows_per_s: float
    phase: str = "features"


# Return False to stop cooperatively (cancellation); w2s.resume.YIELD to write a checkpoint and stop
# (raising Yielded), to resume later; None or True to go on.
ProgressCallback = Callable[[Progress | ExtractionProgress | CheckpointSaved | Resumed], bool | str | None]


class Stopped(Exception):
    """The progress callback asked to stop."""


class StageError(Exception):
    """A failure that running the stage again would repeat (diverged training, say): not retried."""


class NonFiniteLoss(StageError):
    """The loss became NaN or infinite; training stops at once."""


class TrainData(Protocol):
    """Rows that can be batched: a length per row and a collate function."""

    lengths: Sequence[int]

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor | bool]: ...


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: to a GPU through pinned memory and without blocking, so the copy
    overlaps the kernels already queued instead of waiting for them."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class TokenData:
    """Tokenised texts, padded per batch to the batch's longest row (dynamic padding)."""

    ids: list[list[int]]
    pad_id: int
    padding_side: str = "right"
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(row) for row in self.ids]

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor | bool]:
        width = max(self.lengths[i] for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = self.lengths[i]
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(self.ids[i], dtype=torch.long)
            attention_mask[row, cols] = 1
        # Known here, on the host: the model need not read the mask back from the device to find out.
        left_padded = self.padding_side == "left" and any(self.lengths[i] < width for i in indices)
        return {
            "input_ids": to_device(input_ids, device),
            "attention_mask": to_device(attention_mask, device),
            "left_padded": left_padded,
        }


@dataclass
class FeatureData:
    """Cached backbone features (probe mode): every row has the same length."""

    features: torch.Tensor  # (n, hidden)
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [1] * len(self.features)

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor | bool]:
        return {"features": to_device(self.features[list(indices)], device)}


@dataclass
class Rows:
    """A subset of another :class:`TrainData`'s rows (the training rows, or the held-out ones)."""

    data: TrainData
    indices: Sequence[int]
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [self.data.lengths[i] for i in self.indices]

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor | bool]:
        return self.data.collate([self.indices[i] for i in indices], device)


# The hold-out draws from its own random stream, so it never moves with the batch order.
HOLDOUT_STREAM = 0x401D


def holdout_split(n_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): a seeded ``fraction`` of ``n_rows`` held out, at least one
    row each when ``fraction`` > 0, both in ascending order; no hold-out when ``fraction`` is 0."""
    if fraction <= 0:
        return list(range(n_rows)), []
    n_holdout = min(max(1, round(fraction * n_rows)), n_rows - 1)
    if n_holdout < 1:
        raise ValueError(f"holdout_frac {fraction}: {n_rows} training row(s) leave none to hold out")
    order = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(n_rows)
    return sorted(order[n_holdout:].tolist()), sorted(order[:n_holdout].tolist())


def token_limit(tokenizer: object, max_length: int) -> int:
    """The longest input allowed: max_length, or less if the tokenizer's model takes less."""
    return min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)


def token_lengths(tokenizer: object, texts: Sequence[str]) -> list[int]:
    """Untruncated length in tokens (special tokens included) of each text."""
    encoded = tokenizer(list(texts), truncation=False, padding=False)  # type: ignore[operator]
    return [len(ids) for ids in encoded["input_ids"]]


def tokenize(
    tokenizer: object, texts: Sequence[str], max_length: int, truncation: str = "right"
) -> list[list[int]]:
    """Token ids per text, cut to the limit from the ``truncation`` side ("drop" data has no over-long
    rows left, so any side will do), without padding (batches pad themselves)."""
    limit = token_limit(tokenizer, max_length)
    side = "left" if truncation == "left" else "right"
    previous = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = side  # type: ignore[attr-defined]
    try:
        encoded = tokenizer(list(texts), truncation=True, max_length=limit, padding=False)  # type: ignore[operator]
    finally:
        tokenizer.truncation_side = previous  # type: ignore[attr-defined]
    return [ids if ids else [tokenizer.pad_token_id] for ids in encoded["input_ids"]]  # type: ignore[attr-defined]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """One epoch of batches: shuffle, sort chunks by length, cut into batches, shuffle batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk].tolist(), key=lambda i: lengths[i])  # stable
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to zero."""
    warmup = int(config.warmup_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware. ``torch.cuda.is_bf16_supported()`` alone also says
    yes where bf16 is only emulated (pre-Ampere GPUs), which runs far slower than float32."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the hardware has it for "auto", else as asked; None (no
    autocast) for float32 and tf32."""
    if dtype in ("float32", "tf32"):
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


# cuBLAS reuses its workspace in a fixed way with this setting, which deterministic GPU runs need.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def numerics(precision: str, deterministic: bool) -> Iterator[None]:
    """The process-wide numeric settings a stage runs under, restored afterwards (a worker's
    long-lived process runs many stages): TensorFloat-32 matmuls only for ``tf32`` (every float32
    matmul elsewhere stays exact float32, as asked; under bf16 autocast the matmuls are bf16
    anyway), and deterministic algorithms when asked (on a GPU, SDPA's backward and some reductions
    otherwise use atomics whose order varies from run to run)."""
    previous_precision = torch.get_float32_matmul_precision()
    previous_cudnn_tf32 = torch.backends.cudnn.allow_tf32
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if deterministic:
        # Read by cuBLAS when it first creates a handle in this process, and checked by torch at
        # every cuBLAS call under deterministic algorithms: set before the stage's first kernel.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        torch.backends.cudnn.allow_tf32 = previous_cudnn_tf32
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.backends.cudnn.benchmark = previous_benchmark


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_train_mode(model: nn.Module, dropout: bool) -> None:
    """Training mode, with dropout only if asked. Without dropout the model stays in eval mode, as the
    reference trains; layers that checkpoint activations are flagged as training on their own (not
    their children), because transformers only checkpoints in training mode."""
    model.train(dropout)
    if not dropout:
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True


@dataclass
class FitResult:
    steps: int
    stopped: bool
    final_loss: float
    seconds: float
    examples: int
    best_step: int | None = None  # with a hold-out: the step whose weights were kept
    holdout_loss: float | None = None  # with a hold-out: its loss at best_step


@dataclass
class Holdout:
    """Held-out rows and the labels the stage trains on (weak labels for a student): after every
    epoch their loss is measured; the best epoch's weights are kept; training stops after
    ``patience`` epochs without improvement."""

    data: TrainData
    labels: torch.Tensor  # (n, 2)
    patience: int


@torch.no_grad()
def holdout_loss(
    model: nn.Module,
    holdout: Holdout,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    """Mean cross-entropy of the model's predictions against the held-out rows' (soft) labels."""
    n = len(holdout.data.lengths)
    total = torch.zeros((), device=device)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(n, start + batch_size)))
        with autocast(device, amp_dtype):
            logits = model(**holdout.data.collate(indices, device))
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = to_device(holdout.labels[indices].float(), device)
        total += -(targets * log_probs).sum()
    return float(total) / n  # one read from the device per evaluation


class _BestWeights:
    """A copy of the trained parameters at the best held-out loss so far (kept on the CPU)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.loss = math.inf
        self.step: int | None = None
        self.since_best = 0
        self.state: dict[str, torch.Tensor] = {}

    def observe(self, loss: float, step: int) -> None:
        if loss < self.loss:
            self.loss, self.step, self.since_best = loss, step, 0
            self.state = {
                name: p.detach().to("cpu", copy=True)
                for name, p in self.model.named_parameters()
                if p.requires_grad
            }
        else:
            self.since_best += 1

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self.state:
                p.copy_(self.state[name])

    def state_dict(self) -> dict[str, object]:
        return {"loss": self.loss, "step": self.step, "since_best": self.since_best, "weights": self.state}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.loss, self.step = float(state["loss"]), state["step"]  # type: ignore[arg-type]
        self.since_best = int(state["since_best"])  # type: ignore[call-overload]
        self.state = dict(state["weights"])  # type: ignore[call-overload]


def _restore(
    state: dict[str, object],
    steps: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    best: _BestWeights | None,
    loss_fn: Loss,
) -> bool:
    """Put a checkpoint's training state back; False (nothing changed) if it is not this run's: another
    number of steps, or other trainable weights."""
    weights: dict[str, torch.Tensor] = state["weights"]  # type: ignore[assignment]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if (
        state["total_steps"] != steps
        or set(weights) != set(trainable)
        or (state["best"] is None) != (best is None)
    ):
        logger.warning("the resume checkpoint is of another run (steps or weights differ); starting over")
        return False
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
    scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
    scaler.load_state_dict(state["scaler"])  # type: ignore[arg-type]
    if best is not None:
        best.load_state_dict(state["best"])  # type: ignore[arg-type]
    if state.get("loss_state") is not None and hasattr(loss_fn, "load_state_dict"):
        loss_fn.load_state_dict(state["loss_state"])
    restore_rng_states(state["rng"])  # type: ignore[arg-type]
    return True


def total_steps(n_rows: int, config: TrainConfig) -> int:
    exact = n_rows * config.epochs / config.batch_size
    return max(1, math.floor(exact) if config.steps_rounding == "down" else math.ceil(exact))


def _batch_stream(
    data: TrainData, config: TrainConfig, rng: np.random.Generator, steps: int
) -> Iterator[list[int]]:
    if config.batch_order == "sequential":
        # The data's own order, pass after pass, batches running on across the end of a pass.
        n = len(data.lengths)
        for step in range(steps):
            start = step * config.batch_size
            yield [i % n for i in range(start, start + config.batch_size)]
        return
    emitted = 0
    while emitted < steps:
        for batch in length_bucketed_batches(data.lengths, config.batch_size, rng):
            yield batch
            emitted += 1
            if emitted == steps:
                return


def _minibatches(batch: list[int], size: int) -> list[list[int]]:
    return [batch[start : start + size] for start in range(0, len(batch), size)]


def fit(
    model: nn.Module,
    data: TrainData,
    soft_labels: torch.Tensor,
    config: TrainConfig,
    loss_fn: Loss,
    *,
    device: torch.device,
    seed: int,
    evaluate: Callable[[], float] | None = None,
    callback: ProgressCallback | None = None,
    holdout: Holdout | None = None,
    checkpoints: Checkpoints | None = None,
    checkpoint_policy: CheckpointPolicy | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` against ``soft_labels`` (n, 2). Returns after the configured
    number of steps, when ``callback`` returns False, or when the ``holdout`` loss stopped improving
    (the best epoch's weights are then restored).

    With ``checkpoints``, training goes on from the checkpoint found there (if any), writes one per
    ``checkpoint_policy``, and when ``callback`` answers YIELD writes one and raises Yielded."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    steps = total_steps(len(data.lengths), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, config))
    amp_dtype = autocast_dtype(config.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    logger.info(
        "training %d steps: batch %d (minibatch %d, %d accumulation steps), lr %g, %s",
        steps,
        config.batch_size,
        config.minibatch_size,
        config.batch_size // config.minibatch_size,
        config.lr,
        config.mode,
    )
    labels = soft_labels.to(dtype=torch.float32, device="cpu")  # indexed on the host, per minibatch
    accumulating = config.minibatch_size < config.batch_size
    if accumulating:
        check_minibatch_invariance(loss_fn)  # a plug-in that needs the whole batch must say so
    wants_stats = accumulating and hasattr(loss_fn, "batch_statistics")
    set_train_mode(model, config.train_dropout)
    steps_per_epoch = max(1, math.ceil(len(data.lengths) / config.batch_size))
    best = _BestWeights(model) if holdout is not None else None
    step, loss_value, stopped, examples = 0, float("nan"), False, 0
    first_step, seconds_before = 0, 0.0
    state = checkpoints.load() if checkpoints is not None else None
    if state is not None and _restore(state, steps, model, optimizer, scheduler, scaler, best, loss_fn):
        first_step, examples = int(state["step"]), int(state["examples"])
        seconds_before, loss_value = float(state["seconds"]), float(state["loss"])
        logger.info("resuming from the checkpoint at step %d of %d", first_step, steps)
        if callback is not None:
            callback(Resumed(first_step, steps))
    clock = CheckpointClock(checkpoint_policy or CheckpointPolicy(), first_step)

    def checkpoint(done: int) -> None:
        assert checkpoints is not None
        began = time.perf_counter()
        size = checkpoints.save(
            {
                "format": FORMAT,
                "step": done,
                "total_steps": steps,
                "examples": examples,
                "seconds": seconds_before + began - started,
                "loss": loss_value,
                "weights": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states(),
                "best": best.state_dict() if best is not None else None,
                "loss_state": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
            }
        )
        clock.reset(done)
        logger.info("checkpoint at step %d: %.1f MB in %.2f s", done, size / 1e6, time.perf_counter() - began)
        if callback is not None:
            callback(CheckpointSaved(done, steps, time.perf_counter() - began, size))

    # The batch order is replayed from the seed: a resumed run skips the batches it has trained on.
    batches = itertools.islice(_batch_stream(data, config, rng, steps), first_step, None)
    for step, batch in enumerate(batches, start=first_step):
        step_frac = step / steps
        minibatches = _minibatches(batch, config.minibatch_size)
        stats = None
        if wants_stats:
            # The loss's batch statistics come from the whole batch's logits, as if there were no
            # accumulation: a forward pass without gradients first, over the same minibatches.
            with torch.no_grad(), autocast(device, amp_dtype):
                batch_logits = torch.cat([model(**data.collate(mb, device)) for mb in minibatches])
            stats = batch_statistics(
                loss_fn, batch_logits.float(), to_device(labels[batch], device), step_frac
            )
        # The step's loss and correct count stay on the device until the step ends: reading them
        # per minibatch would make the host wait for the device each time (one read per step).
        batch_loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for minibatch in minibatches:
            inputs = data.collate(minibatch, device)
            targets = to_device(labels[minibatch], device)  # (minibatch, 2)
            with autocast(device, amp_dtype):
                logits = model(**inputs)
            loss = minibatch_loss(loss_fn, logits.float(), targets, step_frac, stats)
            # Weight by size so a short last minibatch counts for what it holds.
            share = len(minibatch) / len(batch)
            scaler.scale(loss * share).backward()
            batch_loss += loss.detach() * share
            correct += (logits.detach().argmax(dim=1) == targets.argmax(dim=1)).sum()
        loss_read, correct_read = torch.stack([batch_loss, correct.to(batch_loss.dtype)]).tolist()
        if not math.isfinite(loss_read):
            # Before the optimizer step: the weights keep the last finite step's values.
            raise NonFiniteLoss(
                f"loss became non-finite at step {step + 1} of {steps} ({loss_read}); "
                "lower lr, or use dtype float32"
            )
        step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        examples += len(batch)
        loss_value = loss_read
        eval_accuracy = None
        is_last = step + 1 == steps
        if evaluate is not None and config.eval_every and ((step + 1) % config.eval_every == 0 or is_last):
            eval_accuracy = evaluate()
            set_train_mode(model, config.train_dropout)
        if best is not None and holdout is not None and ((step + 1) % steps_per_epoch == 0 or is_last):
            model.eval()
            best.observe(
                holdout_loss(
                    model, holdout, batch_size=config.minibatch_size, device=device, amp_dtype=amp_dtype
                ),
                step + 1,
            )
            set_train_mode(model, config.train_dropout)
            if best.since_best >= holdout.patience and not is_last:
                logger.info(
                    "early stop at step %d: best held-out loss %.4f at step %s",
                    step + 1,
                    best.loss,
                    best.step,
                )
                is_last = True
        if callback is not None:
            progress = Progress(
                step=step + 1,
                total_steps=steps,
                loss=loss_read,
                train_accuracy=correct_read / len(batch),
                lr=step_lr,
                eval_accuracy=eval_accuracy,
            )
            answer = callback(progress)
            if answer is False:
                stopped = True
                break
            if answer == YIELD and not is_last:
                if checkpoints is None:
                    raise Yielded(0, steps)  # nothing to resume from: the stage starts over
                checkpoint(step + 1)
                raise Yielded(step + 1, steps)
        if is_last:
            break
        if checkpoints is not None and clock.due(step + 1):
            checkpoint(step + 1)
    model.eval()
    if best is not None and best.step is not None:
        best.restore()
    return FitResult(
        steps=step + 1,
        stopped=stopped,
        final_loss=loss_value,
        seconds=seconds_before + time.perf_counter() - started,
        examples=examples,
        best_step=best.step if best is not None else None,
        holdout_loss=best.loss if best is not None and best.step is not None else None,
    )


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    data: TrainData,
    *,
    batch_size: int,
    device: torch.device,
    dtype: str = "auto",
) -> np.ndarray:
    """P(label = 1) for every row, in row order. Batches are length-sorted to minimise padding."""
    was_training = model.training
    model.eval()
    amp_dtype = autocast_dtype(dtype, device)
    order = sorted(range(len(data.lengths)), key=lambda i: data.lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        with autocast(device, amp_dtype):
            logits = model(**data.collate(indices, device))
        batches.append(torch.softmax(logits.float(), dim=-1)[:, 1])
    probs = np.empty(len(order), dtype=np.float64)
    if batches:
        probs[order] = torch.cat(batches).cpu().numpy()  # one read from the device
    model.train(was_training)
    return probs


# Extraction reports progress at most this often (a report costs a database write in the service).
EXTRACTION_REPORT_S = 1.0


@torch.no_grad()
def extract_features(
    model: nn.Module,
    data: TokenData,
    *,
    batch_size: int,
    device: torch.device,
    dtype: str = "auto",
    callback: ProgressCallback | None = None,
    split: str = "",
) -> torch.Tensor:
    """Pooled backbone features (n, hidden) in float32, computed once without gradients. Reports
    rows done to ``callback`` about every second; raises Stopped if it returns False."""
    model.eval()
    amp_dtype = autocast_dtype(dtype, device)
    order = sorted(range(len(data.lengths)), key=lambda i: data.lengths[i])
    features: torch.Tensor | None = None
    started = last_report = time.perf_counter()
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        with autocast(device, amp_dtype):
            batch_features = model.features(**data.collate(indices, device)).float().cpu()
        if features is None:
            features = torch.empty((len(order), batch_features.shape[1]), dtype=torch.float32)
        features[indices] = batch_features
        now = time.perf_counter()
        done = start + len(indices)
        if callback is not None and (now - last_report >= EXTRACTION_REPORT_S or done == len(order)):
            last_report = now
            rate = done / max(now - started, 1e-9)
            if callback(ExtractionProgress(split, done, len(order), rate)) is False:
                raise Stopped(f"stopped while computing features of {split or 'the texts'}")
    if features is None:
        raise ValueError("cannot extract features from an empty dataset")
    return features


def one_hot(labels: Sequence[int]) -> torch.Tensor:
    """Hard labels as (n, 2) probabilities."""
    return torch.nn.functional.one_hot(torch.tensor(list(labels), dtype=torch.long), 2).float()


def soft(probs_pos: np.ndarray) -> torch.Tensor:
    """P(label = 1) as (n, 2) probabilities."""
    # A copy: the stored soft labels are shared read-only arrays (worker/stage_cache.py), which torch
    # warns about sharing memory with; the result is a new tensor anyway.
    p = torch.tensor(np.asarray(probs_pos), dtype=torch.float32)
    return torch.stack([1 - p, p], dim=1)
