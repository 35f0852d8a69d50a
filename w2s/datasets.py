"""Binary text-classification datasets for weak-to-strong experiments.

The registry follows openai/weak-to-strong ``weak_to_strong/datasets.py`` (Burns et al. 2023): the same
Hugging Face ids, the same formatters (``Q: {question} A: {answer}`` for SciQ, chosen-vs-rejected for
HH-RLHF, ...) and the same hub split used as "test" (BoolQ and Cosmos QA use ``validation``, whose labels
are public). Two sentiment sets are added: ``sst2`` and ``imdb``.

Rows come either from the hub (``datasets.load_dataset``) or, when ``data_dir`` is given, from
``<data_dir>/<name>/<split>.jsonl`` files holding the dataset's *original* fields. Which file serves as
the train and the test split is listed per dataset in ``_REGISTRY`` (``offline_splits``) and described in
:func:`list_datasets`.

Sampling is deterministic in its seeds: the test sample in ``seed``, the train sample and its halves in
``train_seed`` (the same unless given). Two ways to draw:

* ``"random"`` (the default): the row order is a seeded permutation of the split; the first rows of that
  permutation are formatted (with a fresh ``random.Random(seed)``, as the reference does) until ``n``
  non-empty examples are collected. A sample of ``n`` rows is therefore a prefix of the sample of ``n + k``
  rows, and rows that are never drawn are never parsed. The train sample is then cut into two disjoint
  halves: A (first ``floor(n/2)``) trains the weak model, B (the rest) receives the weak labels.
* ``"reference"``: as openai/weak-to-strong ``load_dataset`` + ``train_test_split``: the *first* ``n`` rows
  of the split in file order, formatted in that order with ``random.Random(seed)``, shuffled with
  ``numpy.random.default_rng(seed).permutation`` (Hugging Face ``Dataset.shuffle(seed)``), then split as
  ``Dataset.train_test_split(test_size=0.5, seed)``: B is the ``ceil(n/2)`` rows at the first positions of
  a second ``default_rng(seed)`` permutation, A the rest. The same seed and rows give the same halves as
  the reference.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import logging
import numbers
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

logger = logging.getLogger(__name__)

# Rows fetched per batch from a hub dataset: large enough to amortize Arrow access, small enough that a
# small sample of a huge split (amazon_polarity has 3.6M rows) reads little.
_HUB_CHUNK = 1024
# Fraction of a custom file held out as test when neither test_path nor n_test is given.
_DEFAULT_HOLDOUT_FRACTION = 0.2
_HASH_VERSION = b"w2s-labeled-texts-v1\n"


# --------------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledTexts:
    """Parallel tuples of texts and 0/1 labels; immutable so a split can be shared and hashed safely."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples, so instances stay immutable and comparable.
        texts = tuple(self.texts)
        labels = tuple(self.labels)
        if len(texts) != len(labels):
            raise ValueError(f"LabeledTexts: {len(texts)} texts but {len(labels)} labels")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"LabeledTexts: text {i} is {type(text).__name__}, expected str")
        for i, label in enumerate(labels):
            # Integral admits bool and numpy integers; floats like 0.5 must not be truncated silently.
            if not isinstance(label, numbers.Integral) or label not in (0, 1):
                raise ValueError(f"LabeledTexts: label {i} is {label!r}, expected 0 or 1")
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", tuple(int(label) for label in labels))

    def __len__(self) -> int:
        return len(self.texts)

    def content_hash(self) -> str:
        """SHA-256 hex digest of the texts and labels, in order (computed once: the instance is frozen).

        Each example is encoded as ``<label>\\t<utf-8 byte length>\\n<utf-8 bytes>`` after a version
        header; the length prefix makes the encoding unambiguous whatever the texts contain.
        """
        cached = self.__dict__.get("_content_hash")
        if cached is not None:
            return str(cached)
        digest = hashlib.sha256(_HASH_VERSION)
        for text, label in zip(self.texts, self.labels, strict=True):
            data = text.encode("utf-8")
            digest.update(f"{label}\t{len(data)}\n".encode("ascii"))
            digest.update(data)
        object.__setattr__(self, "_content_hash", digest.hexdigest())
        return digest.hexdigest()

    def balance(self) -> dict[int, int]:
        """Label -> count; both labels are always present so manifests have a fixed shape."""
        ones = sum(self.labels)
        return {0: len(self.labels) - ones, 1: ones}

    def select(self, indices: Sequence[int]) -> LabeledTexts:
        return LabeledTexts(
            texts=tuple(self.texts[i] for i in indices), labels=tuple(self.labels[i] for i in indices)
        )


@dataclass(frozen=True)
class DatasetSplits:
    """The three splits of one experiment, plus where they came from (for manifests)."""

    name: str  # registry name, or the custom file path
    train_a: LabeledTexts  # half A of the train sample: trains the weak model
    train_b: LabeledTexts  # half B: weak soft labels; the ceiling and the students train here
    test: LabeledTexts
    seed: int | None = None  # drew the test sample
    train_seed: int | None = None  # drew the train sample and its halves
    train_source: str = ""  # e.g. "/data/sst2/train.jsonl" or "hub:stanfordnlp/sst2[train]"
    test_source: str = ""
    # Rows skipped because their formatted text was empty (the only rows ever dropped). For registry
    # datasets this counts the rows drawn while sampling; for custom files, the whole file.
    dropped_empty_train: int = 0
    dropped_empty_test: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: sizes, label balance and content hash per split.

        Balance keys are strings ("0", "1") so the dict is unchanged by a JSON round trip.
        """
        splits: dict[str, Any] = {}
        for split_name, part in (("train_a", self.train_a), ("train_b", self.train_b), ("test", self.test)):
            splits[split_name] = {
                "size": len(part),
                "balance": {str(label): count for label, count in part.balance().items()},
                "content_hash": part.content_hash(),
            }
        return {
            "name": self.name,
            "seed": self.seed,
            "train_seed": self.train_seed,
            "sources": {"train": self.train_source, "test": self.test_source},
            "splits": splits,
            "dropped_empty": {"train": self.dropped_empty_train, "test": self.dropped_empty_test},
        }


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    hf_id: str
    description: str
    offline_splits: tuple[str, ...]  # split files found under <data_dir>/<name>/ (empty without data_dir)


@dataclass(frozen=True)
class CustomSource:
    """A user's JSONL or CSV file with a text column and a 0/1 label column."""

    path: str
    text: str = "text"
    label: str = "label"
    test_path: str | None = None
    format: Literal["jsonl", "csv"] | None = None  # None: inferred from each file's suffix

    def __post_init__(self) -> None:
        if self.format not in (None, "jsonl", "csv"):
            raise ValueError(f"CustomSource.format must be 'jsonl', 'csv' or None, got {self.format!r}")
        if not self.path:
            raise ValueError("CustomSource.path is empty")


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------

Row = Mapping[str, Any]
# (row, rng) -> (text, hard label). The rng is shared by all rows of one split, as in the reference.
Formatter = Callable[[Row, random.Random], tuple[str, int]]


class _RowError(ValueError):
    """A problem with one row; the caller adds the file/line or hub row to the message."""


def _field(row: Row, key: str) -> Any:
    try:
        return row[key]
    except KeyError:
        raise _RowError(f"missing field {key!r} (fields present: {', '.join(map(str, row))})") from None


def _str_field(row: Row, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} is {type(value).__name__} {value!r}, expected a string")
    return value


def _binary_field(row: Row, key: str) -> int:
    """A registry label: bool or int 0/1. Unlabelled hub splits use -1, which must not pass silently."""
    value = _field(row, key)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise _RowError(f"field {key!r} is {value!r}, expected 0/1 or a bool (an unlabelled split?)")


def format_amazon_polarity(row: Row, rng: random.Random) -> tuple[str, int]:
    return f"{_str_field(row, 'title')} {_str_field(row, 'content')}", _binary_field(row, "label")


def format_sciq(row: Row, rng: random.Random) -> tuple[str, int]:
    # As the reference: the correct answer with probability 0.5, else a uniformly drawn distractor. A few
    # upstream rows have a distractor equal to the correct answer; they are kept, like the reference does.
    hard_label = int(rng.random() < 0.5)
    if hard_label:
        answer = _str_field(row, "correct_answer")
    else:
        answer = rng.choice([_str_field(row, f"distractor{i}") for i in (1, 2, 3)])
    return f"Q: {_str_field(row, 'question')} A: {answer}", hard_label


def format_anthropic_hh(row: Row, rng: random.Random) -> tuple[str, int]:
    hard_label = int(rng.random() < 0.5)
    return (_str_field(row, "chosen") if hard_label else _str_field(row, "rejected")), hard_label


def format_cosmos_qa(row: Row, rng: random.Random) -> tuple[str, int]:
    label = _field(row, "label")
    if isinstance(label, bool) or not isinstance(label, int) or label not in range(4):
        raise _RowError(f"field 'label' is {label!r}, expected an answer index 0-3")
    true_answer = _str_field(row, f"answer{label}")
    # The reference always marks "None of the above choices ." answers as wrong (label 0) without drawing
    # from the rng, and rejects other spellings of it; both are kept so outputs match the reference.
    if "None of the above choices ." in true_answer:
        hard_label = 0
    elif "None of the above choices" in true_answer:
        raise _RowError(f"unexpected 'None of the above choices' variant as the true answer: {true_answer!r}")
    else:
        hard_label = int(rng.random() < 0.5)
    if hard_label:
        answer = true_answer
    else:
        wrong = [a for a in (_str_field(row, f"answer{i}") for i in range(4)) if a != true_answer]
        if not wrong:
            raise _RowError("all four answers equal the true answer; no wrong answer to show")
        answer = rng.choice(wrong)
    text = f"Context: {_str_field(row, 'context')}\nQuestion: {_str_field(row, 'question')}\nAnswer: {answer}"
    return text, hard_label


def format_boolq(row: Row, rng: random.Random) -> tuple[str, int]:
    text = f"Passage: {_str_field(row, 'passage')}\nQuestion: {_str_field(row, 'question')}"
    return text, _binary_field(row, "answer")


def format_sst2(row: Row, rng: random.Random) -> tuple[str, int]:
    return _str_field(row, "sentence"), _binary_field(row, "label")


def format_imdb(row: Row, rng: random.Random) -> tuple[str, int]:
    return _str_field(row, "text"), _binary_field(row, "label")


@dataclass(frozen=True)
class _Entry:
    name: str
    hf_id: str
    description: str
    formatter: Formatter
    # Our split ("train"/"test") -> the hub split loaded for it.
    hub_splits: Mapping[str, str]
    # Our split -> file stems tried in order under <data_dir>/<name>/; the first that exists is used.
    offline_splits: Mapping[str, tuple[str, ...]]


_REGISTRY: dict[str, _Entry] = {}


def _register(entry: _Entry) -> None:
    _REGISTRY[entry.name] = entry


_register(
    _Entry(
        name="sciq",
        hf_id="sciq",
        description="SciQ science questions: 'Q: ... A: ...' with the correct answer or a random distractor",
        formatter=format_sciq,
        hub_splits={"train": "train", "test": "test"},
        offline_splits={"train": ("train",), "test": ("test",)},
    )
)
_register(
    _Entry(
        name="boolq",
        hf_id="boolq",
        description="BoolQ yes/no questions over a passage; label = answer",
        formatter=format_boolq,
        # The BoolQ test split is unlabelled, so the reference tests on validation. In the offline data
        # dir the official dev set is stored as test.jsonl, hence the fallback.
        hub_splits={"train": "train", "test": "validation"},
        offline_splits={"train": ("train",), "test": ("validation", "test")},
    )
)
_register(
    _Entry(
        name="amazon_polarity",
        hf_id="amazon_polarity",
        description="Amazon review polarity: '{title} {content}'",
        formatter=format_amazon_polarity,
        hub_splits={"train": "train", "test": "test"},
        offline_splits={"train": ("train",), "test": ("test",)},
    )
)
_register(
    _Entry(
        name="anthropic_hh",
        hf_id="Anthropic/hh-rlhf",
        description="HH-RLHF: the chosen (label 1) or the rejected (label 0) dialogue, at random",
        formatter=format_anthropic_hh,
        hub_splits={"train": "train", "test": "test"},
        offline_splits={"train": ("train",), "test": ("test",)},
    )
)
_register(
    _Entry(
        name="cosmos_qa",
        hf_id="cosmos_qa",
        description="Cosmos QA: context, question and the true answer or a random wrong one",
        formatter=format_cosmos_qa,
        # Official test labels are hidden; the reference tests on validation (stored offline as test.jsonl).
        hub_splits={"train": "train", "test": "validation"},
        offline_splits={"train": ("train",), "test": ("validation", "test")},
    )
)
_register(
    _Entry(
        name="sst2",
        hf_id="stanfordnlp/sst2",
        description="SST-2 movie-review sentences; label 1 = positive",
        formatter=format_sst2,
        # The GLUE/HF test split is unlabelled (-1), so the hub path tests on validation. The offline
        # test.jsonl is the labelled SST binary test set and is preferred; validation.jsonl is the fallback.
        hub_splits={"train": "train", "test": "validation"},
        offline_splits={"train": ("train",), "test": ("test", "validation")},
    )
)
_register(
    _Entry(
        name="imdb",
        hf_id="stanfordnlp/imdb",
        description="IMDB long movie reviews; label 1 = positive",
        formatter=format_imdb,
        hub_splits={"train": "train", "test": "test"},
        offline_splits={"train": ("train",), "test": ("test",)},
    )
)


def dataset_names() -> list[str]:
    """Registry names, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}") from None


def offline_layout(name: str) -> tuple[str, dict[str, tuple[str, ...]]]:
    """Where registry dataset ``name``'s files sit under a data directory: its folder, and per split
    ("train", "test") the file stems tried in order (``<folder>/<stem>.jsonl``)."""
    entry = _entry(name)
    return entry.name, dict(entry.offline_splits)


def _available_splits(data_dir: Path, name: str) -> tuple[str, ...]:
    directory = data_dir / name
    if not directory.is_dir():
        return ()
    return tuple(sorted(p.stem for p in directory.glob("*.jsonl") if p.is_file()))


def list_datasets(data_dir: Path | None = None) -> list[DatasetInfo]:
    """Registry entries; with data_dir, also which split files exist offline for each."""
    root = Path(data_dir) if data_dir is not None else None
    return [
        DatasetInfo(
            name=entry.name,
            hf_id=entry.hf_id,
            description=entry.description,
            offline_splits=_available_splits(root, entry.name) if root is not None else (),
        )
        for entry in _REGISTRY.values()
    ]


# --------------------------------------------------------------------------------------------------------
# Row sources: random access by index, so only the rows drawn are parsed
# --------------------------------------------------------------------------------------------------------


class _Rows(Protocol):
    origin: str  # where the rows come from, for manifests and error messages

    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int]) -> Iterator[tuple[Row, str]]:
        """Yield (row, location) for each index, in the order given."""
        ...


class _JsonlRows:
    """A JSONL file held as raw lines; a line is decoded only when drawn."""

    def __init__(self, path: Path) -> None:
        self.origin = str(path)
        self._path = path
        self._lines: list[tuple[int, str]] = []
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():  # blank lines (e.g. a trailing newline) are not rows
                    self._lines.append((line_no, line))

    def __len__(self) -> int:
        return len(self._lines)

    def get(self, indices: Sequence[int]) -> Iterator[tuple[Row, str]]:
        for index in indices:
            line_no, line = self._lines[index]
            location = f"{self._path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{location}: invalid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{location}: expected a JSON object, got {type(row).__name__}")
            yield row, location


class _HubRows:
    """A Hugging Face ``Dataset``, read in chunks of the drawn indices."""

    def __init__(self, dataset: Any, origin: str) -> None:
        self.origin = origin
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def get(self, indices: Sequence[int]) -> Iterator[tuple[Row, str]]:
        for start in range(0, len(indices), _HUB_CHUNK):
            chunk = [int(i) for i in indices[start : start + _HUB_CHUNK]]
            for index, row in zip(chunk, self._dataset.select(chunk), strict=True):
                yield row, f"{self.origin} row {index}"


def _load_hub(entry: _Entry, split: str) -> _HubRows:
    hub_split = entry.hub_splits[split]
    # Imported lazily: it is heavy, and this module's own name shadows it for plain `import datasets`
    # when w2s/ itself is on sys.path.
    hf_datasets = importlib.import_module("datasets")
    logger.info("loading %s split %r from the Hugging Face hub", entry.hf_id, hub_split)
    try:
        dataset = hf_datasets.load_dataset(entry.hf_id, split=hub_split)
    except Exception as exc:
        raise RuntimeError(
            f"could not load {entry.hf_id!r} split {hub_split!r} from the Hugging Face hub ({exc}); "
            "for offline runs pass a data dir holding <name>/<split>.jsonl files"
        ) from exc
    return _HubRows(dataset, f"hub:{entry.hf_id}[{hub_split}]")


def offline_split_file(name: str, split: str, data_dir: Path) -> Path:
    """The file that serves registry dataset ``name``'s ``split`` ("train" or "test") under
    ``data_dir``; ValueError naming the paths looked for and the splits that exist."""
    entry = _entry(name)
    candidates = entry.offline_splits[split]
    for stem in candidates:
        path = Path(data_dir) / entry.name / f"{stem}.jsonl"
        if path.is_file():
            if stem != candidates[0]:
                logger.info("%s: using %s as the %s split", entry.name, path, split)
            return path
    looked = ", ".join(str(Path(data_dir) / entry.name / f"{stem}.jsonl") for stem in candidates)
    available = _available_splits(Path(data_dir), entry.name)
    raise ValueError(
        f"dataset {entry.name!r} has no {split!r} split in the data dir: looked for {looked}; "
        f"available splits: {', '.join(available) if available else 'none'}"
    )


def _load_offline(entry: _Entry, split: str, data_dir: Path) -> _JsonlRows:
    return _JsonlRows(offline_split_file(entry.name, split, data_dir))


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


def _order_rng(seed: int, purpose: str) -> random.Random:
    # Permutations use their own stream (a str seed is hashed with SHA-512, so it is stable across runs).
    # Sharing random.Random(seed) with the formatter would tie a row's position to its own label draw.
    return random.Random(f"w2s:{purpose}:{seed}")


Sampling = Literal["random", "reference"]


def _draw(
    rows: _Rows,
    n: int | None,
    *,
    seed: int,
    split: str,
    formatter: Formatter,
    what: str,
    sampling: Sampling = "random",
) -> tuple[LabeledTexts, int]:
    """Format rows in a seeded order (``"random"``) or in file order (``"reference"``) until n non-empty
    examples are collected; return them and #dropped."""
    total = len(rows)
    if n is not None and n > total:
        raise ValueError(
            f"{what}: n_{split}={n} requested but only {total} {split} rows exist ({rows.origin})"
        )
    order = list(range(total))
    if sampling == "random":
        _order_rng(seed, split).shuffle(order)
    # A fresh Random(seed) per split, as the reference formatter does.
    format_rng = random.Random(seed)
    want = total if n is None else n
    texts: list[str] = []
    labels: list[int] = []
    dropped = 0
    position = 0
    while len(texts) < want and position < total:
        # Read only as many rows as still needed (plus what empty rows force us to read).
        chunk = order[position : position + (want - len(texts))]
        position += len(chunk)
        for row, location in rows.get(chunk):
            try:
                text, label = formatter(row, format_rng)
            except _RowError as exc:
                raise ValueError(f"{what}: {location}: {exc}") from exc
            if not text.strip():
                dropped += 1
                continue
            texts.append(text)
            labels.append(label)
    if n is not None and len(texts) < n:
        raise ValueError(
            f"{what}: n_{split}={n} requested but only {len(texts)} of the {total} {split} rows have "
            f"non-empty text ({rows.origin})"
        )
    if dropped:
        logger.warning("%s: dropped %d %s rows with empty text", what, dropped, split)
    return LabeledTexts(texts=tuple(texts), labels=tuple(labels)), dropped


def _halves(sample: LabeledTexts, *, seed: int, sampling: Sampling) -> tuple[LabeledTexts, LabeledTexts]:
    """Halves A (floor(n/2) rows) and B (ceil(n/2) rows) of the train sample."""
    if sampling == "random":
        cut = len(sample) // 2  # the sample is already in a seeded random order
        return sample.select(range(cut)), sample.select(range(cut, len(sample)))
    # The reference: Dataset.shuffle(seed) then train_test_split(test_size=0.5, seed): "test" (B) takes
    # the first ceil(n/2) positions of a default_rng(seed) permutation of the shuffled rows, "train" (A)
    # the rest, in permutation order.
    n = len(sample)
    shuffled = np.random.default_rng(seed).permutation(n)
    split_order = np.random.default_rng(seed).permutation(n)
    n_b = -(-n // 2)
    b = [int(shuffled[i]) for i in split_order[:n_b]]
    a = [int(shuffled[i]) for i in split_order[n_b:]]
    return sample.select(a), sample.select(b)


def _check_sizes(n_train: int | None, n_test: int | None) -> None:
    # Both halves must be non-empty for the weak model and the students to train.
    if n_train is not None and n_train < 2:
        raise ValueError(f"n_train must be at least 2 (one example per half), got {n_train}")
    if n_test is not None and n_test < 1:
        raise ValueError(f"n_test must be at least 1, got {n_test}")


def load_splits(
    *,
    name: str | None = None,
    source: CustomSource | None = None,
    n_train: int | None,
    n_test: int | None,
    seed: int,
    data_dir: Path | None,
    train_seed: int | None = None,
    sampling: Sampling = "random",
) -> DatasetSplits:
    """Load a registry dataset (``name``) or a custom file (``source``) as train halves A/B and test.

    ``n_train``/``n_test`` of None take every row. ``data_dir`` selects offline JSONL files for registry
    datasets (it is not used for custom files). ``seed`` draws the test sample (and a custom file's
    hold-out); ``train_seed`` (default ``seed``) draws the train sample and its halves, so experiments
    can redraw the training data per seed while every seed is tested on the same rows.
    """
    if (name is None) == (source is None):
        raise ValueError("load_splits needs exactly one of name= (a registry dataset) or source= (a file)")
    if sampling not in ("random", "reference"):
        raise ValueError(f"sampling must be 'random' or 'reference', got {sampling!r}")
    _check_sizes(n_train, n_test)
    seeds = {"seed": seed, "train_seed": seed if train_seed is None else train_seed}
    if source is not None:
        return _load_custom(source, n_train=n_train, n_test=n_test, sampling=sampling, **seeds)
    return _load_registry(
        str(name), n_train=n_train, n_test=n_test, data_dir=data_dir, sampling=sampling, **seeds
    )


def _load_registry(
    name: str,
    *,
    n_train: int | None,
    n_test: int | None,
    seed: int,
    train_seed: int,
    data_dir: Path | None,
    sampling: Sampling,
) -> DatasetSplits:
    entry = _entry(name)
    root = Path(data_dir) if data_dir is not None else None

    def rows_for(split: str) -> _Rows:
        return _load_offline(entry, split, root) if root is not None else _load_hub(entry, split)

    train_rows = rows_for("train")
    test_rows = rows_for("test")
    train, dropped_train = _draw(
        train_rows,
        n_train,
        seed=train_seed,
        split="train",
        formatter=entry.formatter,
        what=name,
        sampling=sampling,
    )
    test, dropped_test = _draw(
        test_rows, n_test, seed=seed, split="test", formatter=entry.formatter, what=name, sampling=sampling
    )
    train_a, train_b = _halves(train, seed=train_seed, sampling=sampling)
    return DatasetSplits(
        name=name,
        train_a=train_a,
        train_b=train_b,
        test=test,
        seed=seed,
        train_seed=train_seed,
        train_source=train_rows.origin,
        test_source=test_rows.origin,
        dropped_empty_train=dropped_train,
        dropped_empty_test=dropped_test,
    )


# --------------------------------------------------------------------------------------------------------
# Custom files
# --------------------------------------------------------------------------------------------------------

_TRUE_STRINGS = frozenset({"1", "true"})
_FALSE_STRINGS = frozenset({"0", "false"})


def parse_label(value: Any) -> int:
    """A binary label from a file: 0/1, true/false, or those as strings; ValueError otherwise."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str):
        folded = value.strip().lower()
        if folded in _TRUE_STRINGS:
            return 1
        if folded in _FALSE_STRINGS:
            return 0
    raise ValueError(f"label {value!r} is not one of 0/1, true/false, '0'/'1', 'true'/'false'")


FORMAT_SUFFIXES: dict[str, Literal["jsonl", "csv"]] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def infer_format(name: str | Path, given: str | None = None) -> Literal["jsonl", "csv"]:
    """A custom file's format: ``given`` if set, else from the name's suffix (.jsonl, .ndjson, .csv)."""
    if given in ("jsonl", "csv"):
        return given  # type: ignore[return-value]
    if given:
        raise ValueError(f"format: {given!r} is not supported; use 'jsonl' or 'csv'")
    fmt = FORMAT_SUFFIXES.get(Path(name).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {str(name) or 'the file'!r} from its name; name it *.jsonl or "
            "*.csv, or set format to 'jsonl' or 'csv'"
        )
    return fmt


def _missing_column(
    path: Path, column: str, role: str, present: Sequence[str], where: str = ""
) -> ValueError:
    return ValueError(
        f"{path}{where}: {role} column {column!r} not found; columns present: "
        f"{', '.join(map(str, present)) if present else 'none'}"
    )


def _read_custom(path: Path, source: CustomSource) -> tuple[list[tuple[str, int]], int]:
    """Every row of a custom file as (text, label), validated eagerly; returns the rows and #empty dropped.

    Custom files are parsed in full (unlike registry files) so that a bad label anywhere is reported,
    not only when the seeded sample happens to draw it.
    """
    if not path.is_file():
        raise ValueError(f"custom dataset file not found: {path}")
    fmt = infer_format(path, source.format)
    records: list[tuple[int, Mapping[str, Any]]] = []
    if fmt == "csv":
        # utf-8-sig: spreadsheet exports often start with a BOM, which would corrupt the first column name.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            for column, role in ((source.text, "text"), (source.label, "label")):
                if column not in header:
                    raise _missing_column(path, column, role, header)
            for record in reader:
                records.append((reader.line_num, record))
    else:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {line_no}: invalid JSON ({exc})") from exc
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}"
                    )
                for column, role in ((source.text, "text"), (source.label, "label")):
                    if column not in record:
                        raise _missing_column(path, column, role, list(record), f" line {line_no}")
                records.append((line_no, record))

    examples: list[tuple[str, int]] = []
    dropped = 0
    for line_no, record in records:
        text = record[source.text]
        if not isinstance(text, str):
            # csv gives None when a row has fewer fields than the header.
            raise ValueError(
                f"{path} line {line_no}: column {source.text!r} is {type(text).__name__} {text!r}, "
                "expected a string"
            )
        try:
            label = parse_label(record[source.label])
        except ValueError as exc:
            raise ValueError(f"{path} line {line_no}, column {source.label!r}: {exc}") from exc
        if not text.strip():
            dropped += 1
            continue
        examples.append((text, label))
    if dropped:
        logger.warning("%s: dropped %d rows with empty text", path, dropped)
    return examples, dropped


class _ListRows:
    """Already-validated (text, label) examples, served through the _Rows interface."""

    def __init__(self, examples: Sequence[tuple[str, int]], origin: str) -> None:
        self.origin = origin
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def get(self, indices: Sequence[int]) -> Iterator[tuple[Row, str]]:
        for index in indices:
            text, label = self._examples[index]
            yield {"text": text, "label": label}, f"{self.origin} example {index}"


def _format_validated(row: Row, rng: random.Random) -> tuple[str, int]:
    return row["text"], row["label"]


def _load_custom(
    source: CustomSource,
    *,
    n_train: int | None,
    n_test: int | None,
    seed: int,
    train_seed: int,
    sampling: Sampling,
) -> DatasetSplits:
    train_path = Path(source.path)
    examples, dropped_train = _read_custom(train_path, source)
    dropped_test = 0
    if source.test_path is not None:
        test_path = Path(source.test_path)
        test_examples, dropped_test = _read_custom(test_path, source)
        train_pool: Sequence[tuple[str, int]] = examples
        test_origin = str(test_path)
        test_n = n_test
    else:
        # Hold out a seeded test portion; the rest (in file order) is the train pool.
        total = len(examples)
        n_hold = n_test if n_test is not None else max(1, int(total * _DEFAULT_HOLDOUT_FRACTION))
        if n_hold >= total:
            raise ValueError(
                f"{train_path}: cannot hold out {n_hold} test rows from {total} non-empty rows and keep any "
                "for training; pass a smaller n_test or a test_path"
            )
        order = list(range(total))
        _order_rng(seed, "holdout").shuffle(order)
        held = set(order[:n_hold])
        test_examples = [examples[i] for i in sorted(held)]
        train_pool = [example for i, example in enumerate(examples) if i not in held]
        test_origin = f"{train_path} (seeded hold-out of {n_hold} rows)"
        test_n = None  # the hold-out already has the requested size
        logger.info("%s: held out %d of %d rows as test (seed %d)", train_path, n_hold, total, seed)

    what = str(train_path)
    train_rows = _ListRows(train_pool, str(train_path))
    train, _ = _draw(
        train_rows,
        n_train,
        seed=train_seed,
        split="train",
        formatter=_format_validated,
        what=what,
        sampling=sampling,
    )
    test, _ = _draw(
        _ListRows(test_examples, test_origin),
        test_n,
        seed=seed,
        split="test",
        formatter=_format_validated,
        what=what,
        sampling=sampling,
    )
    train_a, train_b = _halves(train, seed=train_seed, sampling=sampling)
    return DatasetSplits(
        name=source.path,
        train_a=train_a,
        train_b=train_b,
        test=test,
        seed=seed,
        train_seed=train_seed,
        train_source=str(train_path),
        test_source=test_origin,
        dropped_empty_train=dropped_train,
        dropped_empty_test=dropped_test,
    )
