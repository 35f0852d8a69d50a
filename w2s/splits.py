"""Each seed's data as the models see it: the sample, over-long inputs and overlap removal, counted.

For one seed of a job this draws the train sample and its halves (the seed's own sample when
``resample_per_seed``, else the one drawn with ``dataset.seed``) and the test sample (always drawn with
``dataset.seed``, so every seed is scored on the same rows and the paired bootstrap over test rows
holds), then, in this order:

1. **Over-long inputs.** A split is read by several models (half A by the weak model; half B by the
   weak model, which labels it, the ceiling and the students; the test set by all): a row longer than
   the token limit of any reader whose ``truncation`` is ``drop`` is dropped; a row longer than the
   limit of a reader that truncates (``left``/``right``) is counted as truncated. Every model thus
   sees the same rows of a split. A job that would drop more than ``max_dropped_fraction`` of a
   split is refused with the split, the count and the limit.
2. **Overlap.** Rows of either half that contain a test row are removed (no model trains on a test
   row), then rows of half B contained in a row of half A (the weak model must not label what it
   was trained on). See :mod:`w2s.overlap` for what "contained" means. The test set is never cut
   here, so it stays the same for every seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from w2s.datasets import CustomSource, DatasetSplits, LabeledTexts, load_splits
from w2s.overlap import contained_in_any, containing_any
from w2s.spec import CustomDatasetSpec, DataConfig, JobSpec, ModelSpec, TrainConfig, resolved_models

SPLITS = ("train_a", "train_b", "test")


def readers(split: str, roles: Iterable[str]) -> list[str]:
    """The roles (of w2s.spec.resolved_models) whose models read ``split``: half A only the weak
    supervisor; half B and the test set every model (the weak one labels half B)."""
    return ["weak"] if split == "train_a" else list(roles)


class DataError(ValueError):
    """The job's data cannot be used as asked (too many rows dropped, a split left empty)."""


@dataclass(frozen=True)
class SplitCounts:
    """What happened to one split's drawn rows."""

    rows: int  # rows used
    dropped_too_long: int = 0
    truncated: int = 0  # rows used whose input was cut to the limit of some model
    overlap_removed: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SeedData:
    """The rows one seed's stages train, label and test on."""

    seed: int
    train_a: LabeledTexts
    train_b: LabeledTexts
    test: LabeledTexts
    counts: dict[str, SplitCounts]
    drawn: DatasetSplits  # the sample before cleaning (sources, seeds)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: sources, seeds, and per split its size, balance, content hash and counts."""
        summary = self.drawn.summary()
        for name, part in (("train_a", self.train_a), ("train_b", self.train_b), ("test", self.test)):
            summary["splits"][name] = {
                "size": len(part),
                "balance": {str(label): count for label, count in part.balance().items()},
                "content_hash": part.content_hash(),
                **self.counts[name].to_dict(),
            }
        return summary


def load_drawn(
    spec: JobSpec, data_dir: Path | None, *, train_seed: int, data: DataConfig | None = None
) -> DatasetSplits:
    """The raw sample: test drawn with ``dataset.seed``, train and halves with ``train_seed``."""
    data = data or spec.data_config()
    dataset = spec.dataset
    source = (
        CustomSource(**dataset.name.model_dump()) if isinstance(dataset.name, CustomDatasetSpec) else None
    )
    return load_splits(
        name=dataset.name if isinstance(dataset.name, str) else None,
        source=source,
        n_train=dataset.n_train,
        n_test=dataset.n_test,
        seed=dataset.seed,
        train_seed=train_seed,
        data_dir=data_dir,
        sampling=data.sampling,
    )


def train_seed_for(spec: JobSpec, seed: int) -> int:
    """The seed that draws this run's train sample and halves."""
    return seed if spec.data_config().resample_per_seed else spec.dataset.seed


def prepare_seed_data(
    spec: JobSpec,
    seed: int,
    data_dir: Path | None,
    models: dict[str, tuple[ModelSpec, TrainConfig]] | None = None,
) -> SeedData:
    """Draw and clean one seed's data (see the module docstring). Raises DataError, naming the split,
    the count and the limit, when the job's limits would drop too much."""
    data = spec.data_config()
    models = models or resolved_models(spec)
    drawn = load_drawn(spec, data_dir, train_seed=train_seed_for(spec, seed), data=data)

    def fit_lengths(split: str, texts: LabeledTexts) -> tuple[LabeledTexts, list[bool], int]:
        keep, truncated = _length_check(split, texts, models, data.max_dropped_fraction)
        kept = [i for i, ok in enumerate(keep) if ok]
        return texts.select(kept), [truncated[i] for i in kept], len(texts) - len(kept)

    test, test_cut, test_dropped = fit_lengths("test", drawn.test)
    train_a, a_cut, a_dropped = fit_lengths("train_a", drawn.train_a)
    train_b, b_cut, b_dropped = fit_lengths("train_b", drawn.train_b)
    a_removed = b_removed = 0
    if data.remove_overlap:
        train_a, a_cut, a_removed = _without(train_a, a_cut, containing_any(train_a.texts, test.texts))
        train_b, b_cut, for_test = _without(train_b, b_cut, containing_any(train_b.texts, test.texts))
        train_b, b_cut, for_a = _without(train_b, b_cut, contained_in_any(train_b.texts, train_a.texts))
        b_removed = for_test + for_a
    for name, part in (("train_a", train_a), ("train_b", train_b), ("test", test)):
        if len(part) == 0:
            raise DataError(
                f"dataset: no {name} rows are left after dropping over-long and overlapping rows; "
                "raise n_train/n_test or max_length"
            )
    counts = {
        "train_a": SplitCounts(len(train_a), a_dropped, sum(a_cut), a_removed),
        "train_b": SplitCounts(len(train_b), b_dropped, sum(b_cut), b_removed),
        "test": SplitCounts(len(test), test_dropped, sum(test_cut), 0),
    }
    return SeedData(seed, train_a, train_b, test, counts, drawn)


def _without(
    texts: LabeledTexts, truncated: list[bool], remove: list[bool]
) -> tuple[LabeledTexts, list[bool], int]:
    kept = [i for i, gone in enumerate(remove) if not gone]
    return texts.select(kept), [truncated[i] for i in kept], len(texts) - len(kept)


def _length_check(
    split: str,
    texts: LabeledTexts,
    models: dict[str, tuple[ModelSpec, TrainConfig]],
    max_dropped_fraction: float,
) -> tuple[list[bool], list[bool]]:
    """Per row: kept (fits every reader that drops), truncated (longer than some reader's limit)."""
    keep = [True] * len(texts)
    truncated = [False] * len(texts)
    for role in readers(split, models):
        model, config = models[role]
        lengths, limit = token_lengths_and_limit(model, config.max_length, texts)
        too_long = [n > limit for n in lengths]
        if config.truncation != "drop":
            truncated = [t or long for t, long in zip(truncated, too_long, strict=True)]
            continue
        dropped = sum(too_long)
        if len(texts) and dropped / len(texts) > max_dropped_fraction:
            needed = math.ceil(dropped / len(texts) * 100) / 100
            raise DataError(
                f"dataset: truncation 'drop' would drop {dropped} of {len(texts)} {split} rows "
                f"({dropped / len(texts):.0%}): they are longer than {limit} tokens for the {role} model "
                f"{model.model!r} (max_length {config.max_length}). Raise max_length, set truncation to "
                "'left' (cuts the start, keeps the end of each text) or 'right', or raise "
                f"dataset.max_dropped_fraction from {max_dropped_fraction} to at least {needed}"
            )
        keep = [k and not long for k, long in zip(keep, too_long, strict=True)]
    return keep, truncated


def token_lengths_and_limit(model: ModelSpec, max_length: int, texts: LabeledTexts) -> tuple[list[int], int]:
    """Each text's untruncated length in the model's tokens, and the model's token limit."""
    from w2s.train import token_limit

    identity = (model.model, model.revision, model.trust_remote_code)
    return list(_token_lengths(identity, texts)), token_limit(_tokenizer(identity), max_length)


@functools.lru_cache(maxsize=8)
def _tokenizer(identity: tuple[str, str | None, bool]) -> Any:
    from w2s.models import load_tokenizer

    name, revision, trust_remote_code = identity
    return load_tokenizer(ModelSpec(model=name, revision=revision, trust_remote_code=trust_remote_code))


@functools.lru_cache(maxsize=32)
def _token_lengths(identity: tuple[str, str | None, bool], texts: LabeledTexts) -> tuple[int, ...]:
    from w2s.train import token_lengths

    return tuple(token_lengths(_tokenizer(identity), texts.texts))
