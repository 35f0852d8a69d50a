"""Tests for w2s.datasets: registry formatting, offline loading, sampling and custom files.

Most tests build a tiny fake data dir in tmp_path with the datasets' original field layouts; tests
marked ``slow`` also read the real offline data (/work/shared/data) when it is present.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from w2s import datasets as w2s_datasets
from w2s.datasets import (
    CustomSource,
    DatasetSplits,
    LabeledTexts,
    dataset_names,
    format_anthropic_hh,
    format_boolq,
    format_cosmos_qa,
    format_sciq,
    list_datasets,
    load_splits,
)

# ------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _sciq_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "question": f"{prefix} question {i}?",
            "distractor1": f"wrong-{i}-a",
            "distractor2": f"wrong-{i}-b",
            "distractor3": f"wrong-{i}-c",
            "correct_answer": f"right-{i}",
            "support": None,
        }
        for i in range(n)
    ]


def _sst2_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"sentence": f"{prefix} sentence {i}", "label": i % 2, "idx": i} for i in range(n)]


def _boolq_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {"question": f"{prefix} q{i}", "title": "T", "answer": i % 3 == 0, "passage": f"{prefix} passage {i}"}
        for i in range(n)
    ]


def _cosmos_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        answers = [f"{prefix} answer {i}.{k}" for k in range(4)]
        label = i % 4
        if i % 5 == 0:
            answers[label] = "None of the above choices ."
        rows.append(
            {"id": f"id{i}", "context": f"ctx {i}", "question": f"why {i}?", "label": label}
            | {f"answer{k}": answers[k] for k in range(4)}
        )
    return rows


def _hh_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "chosen": f"\n\nHuman: {prefix} {i}\n\nAssistant: good",
            "rejected": f"\n\nHuman: {prefix} {i}\n\nAssistant: bad",
        }
        for i in range(n)
    ]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write_jsonl(root / "sciq" / "train.jsonl", _sciq_rows("train", 41))
    _write_jsonl(root / "sciq" / "test.jsonl", _sciq_rows("test", 15))
    _write_jsonl(root / "sst2" / "train.jsonl", _sst2_rows("train", 30))
    _write_jsonl(root / "sst2" / "validation.jsonl", _sst2_rows("validation", 8))
    _write_jsonl(root / "sst2" / "test.jsonl", _sst2_rows("test", 12))
    _write_jsonl(root / "boolq" / "train.jsonl", _boolq_rows("train", 20))
    _write_jsonl(root / "boolq" / "test.jsonl", _boolq_rows("test", 9))
    _write_jsonl(root / "cosmos_qa" / "train.jsonl", _cosmos_rows("train", 40))
    _write_jsonl(root / "cosmos_qa" / "test.jsonl", _cosmos_rows("test", 10))
    _write_jsonl(root / "anthropic_hh" / "train.jsonl", _hh_rows("train", 30))
    _write_jsonl(root / "anthropic_hh" / "test.jsonl", _hh_rows("test", 10))
    return root


def _real_data_dir() -> Path:
    configured = os.environ.get("W2S_TEST_DATA_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real offline data not found at {path} (set W2S_TEST_DATA_DIR)")
    return path


def _sample(splits: DatasetSplits) -> list[tuple[str, int]]:
    a, b = splits.train_a, splits.train_b
    return list(zip(a.texts + b.texts, a.labels + b.labels, strict=True))


# ------------------------------------------------------------------------------------------------------
# Containers
# ------------------------------------------------------------------------------------------------------


def test_labeled_texts_basics() -> None:
    lt = LabeledTexts(texts=["a", "b", "c"], labels=[1, 0, True])  # type: ignore[arg-type]
    assert lt.texts == ("a", "b", "c") and lt.labels == (1, 0, 1)
    assert len(lt) == 3
    assert lt.balance() == {0: 1, 1: 2}
    assert lt.select([2, 0]) == LabeledTexts(texts=("c", "a"), labels=(1, 1))
    # Order matters for the hash; equal content gives equal hashes.
    assert lt.content_hash() == LabeledTexts(("a", "b", "c"), (1, 0, 1)).content_hash()
    assert lt.content_hash() != lt.select([1, 0, 2]).content_hash()
    assert lt.content_hash() != LabeledTexts(("a", "b", "c"), (1, 1, 1)).content_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", lt.content_hash())
    # Length-prefixing keeps ("ab", "") and ("a", "b") apart.
    assert LabeledTexts(("ab", ""), (0, 0)).content_hash() != LabeledTexts(("a", "b"), (0, 0)).content_hash()


@pytest.mark.parametrize(
    ("texts", "labels"), [(("a",), (2,)), (("a",), (0.5,)), (("a", "b"), (0,)), ((None,), (0,))]
)
def test_labeled_texts_rejects_bad_input(texts: tuple[Any, ...], labels: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="LabeledTexts"):
        LabeledTexts(texts=texts, labels=labels)


def test_registry_names_and_list(data_dir: Path) -> None:
    names = dataset_names()
    for name in ("sciq", "boolq", "amazon_polarity", "anthropic_hh", "cosmos_qa", "sst2", "imdb"):
        assert name in names
    infos = {info.name: info for info in list_datasets(data_dir)}
    assert infos["sst2"].offline_splits == ("test", "train", "validation")
    assert infos["imdb"].offline_splits == ()
    assert infos["anthropic_hh"].hf_id == "Anthropic/hh-rlhf"
    assert all(info.offline_splits == () for info in list_datasets(None))


# ------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------


def test_halves_disjoint_and_cover_sample(data_dir: Path) -> None:
    splits = load_splits(name="sciq", n_train=21, n_test=7, seed=3, data_dir=data_dir)
    assert (len(splits.train_a), len(splits.train_b), len(splits.test)) == (10, 11, 7)
    question = re.compile(r"^Q: (train question \d+)\? A: ")
    a_q = [question.match(t).group(1) for t in splits.train_a.texts]  # type: ignore[union-attr]
    b_q = [question.match(t).group(1) for t in splits.train_b.texts]  # type: ignore[union-attr]
    assert len(set(a_q)) == 10 and len(set(b_q)) == 11
    assert not set(a_q) & set(b_q)
    # The sample is a prefix of the full seeded sample: A + B is exactly the first 21 examples.
    full = load_splits(name="sciq", n_train=None, n_test=None, seed=3, data_dir=data_dir)
    assert len(full.train_a) + len(full.train_b) == 41 and len(full.test) == 15
    assert _sample(full)[:21] == _sample(splits)
    assert {t for t in full.test.texts if t.startswith("Q: train")} == set()


def test_determinism_same_and_different_seed(data_dir: Path) -> None:
    first = load_splits(name="sciq", n_train=20, n_test=10, seed=7, data_dir=data_dir)
    again = load_splits(name="sciq", n_train=20, n_test=10, seed=7, data_dir=data_dir)
    other = load_splits(name="sciq", n_train=20, n_test=10, seed=8, data_dir=data_dir)
    assert first == again
    assert first.summary() == again.summary()
    assert first.train_a.content_hash() != other.train_a.content_hash()
    assert first.test.content_hash() != other.test.content_hash()


def test_summary_shape_and_json_round_trip(data_dir: Path) -> None:
    splits = load_splits(name="sst2", n_train=9, n_test=5, seed=0, data_dir=data_dir)
    summary = splits.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["name"] == "sst2" and summary["seed"] == 0
    assert summary["splits"]["train_a"]["size"] == 4 and summary["splits"]["train_b"]["size"] == 5
    part = summary["splits"]["test"]
    assert part["size"] == 5 and sum(part["balance"].values()) == 5
    assert part["content_hash"] == splits.test.content_hash()
    assert summary["dropped_empty"] == {"train": 0, "test": 0}


def test_n_train_too_large(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"n_train=500 .* only 41 train rows"):
        load_splits(name="sciq", n_train=500, n_test=2, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"n_test=16 .* only 15 test rows"):
        load_splits(name="sciq", n_train=4, n_test=16, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="n_train must be at least 2"):
        load_splits(name="sciq", n_train=1, n_test=2, seed=0, data_dir=data_dir)


def test_empty_texts_dropped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = _sst2_rows("train", 10)
    rows[3]["sentence"] = "   "
    _write_jsonl(root / "sst2" / "train.jsonl", rows)
    _write_jsonl(root / "sst2" / "test.jsonl", _sst2_rows("test", 4))
    splits = load_splits(name="sst2", n_train=None, n_test=None, seed=0, data_dir=root)
    assert len(splits.train_a) + len(splits.train_b) == 9
    assert splits.summary()["dropped_empty"] == {"train": 1, "test": 0}
    with pytest.raises(ValueError, match="only 9 of the 10 train rows have non-empty text"):
        load_splits(name="sst2", n_train=10, n_test=None, seed=0, data_dir=root)


# ------------------------------------------------------------------------------------------------------
# Registry formatting
# ------------------------------------------------------------------------------------------------------


def _reference_sciq(ex: Mapping[str, Any], rng: random.Random) -> tuple[str, int]:
    # openai/weak-to-strong format_sciq, restated to check that rng use matches it draw for draw.
    hard_label = int(rng.random() < 0.5)
    ans = ex["correct_answer"] if hard_label else rng.choice([ex[f"distractor{i}"] for i in (1, 2, 3)])
    return f"Q: {ex['question']} A: {ans}", hard_label


def test_sciq_formatter_matches_reference_rng_use() -> None:
    rows = _sciq_rows("x", 50)
    ours, ref = random.Random(5), random.Random(5)
    assert [format_sciq(r, ours) for r in rows] == [_reference_sciq(r, ref) for r in rows]


def test_sciq_format_and_both_labels(data_dir: Path) -> None:
    splits = load_splits(name="sciq", n_train=None, n_test=None, seed=0, data_dir=data_dir)
    pattern = re.compile(r"^Q: (train|test) question (\d+)\? A: (right-(\d+)|wrong-(\d+)-[abc])$")
    for part in (splits.train_a, splits.train_b, splits.test):
        for text, label in zip(part.texts, part.labels, strict=True):
            match = pattern.match(text)
            assert match, text
            assert label == int(match.group(3).startswith("right"))
            assert match.group(2) == (match.group(4) or match.group(5))  # answer belongs to its question
    all_labels = splits.train_a.labels + splits.train_b.labels
    assert set(all_labels) == {0, 1}


def test_boolq_label_from_answer(data_dir: Path) -> None:
    splits = load_splits(name="boolq", n_train=20, n_test=9, seed=1, data_dir=data_dir)
    pattern = re.compile(r"^Passage: train passage (\d+)\nQuestion: train q(\d+)$")
    for text, label in zip(splits.train_a.texts + splits.train_b.texts, _sample(splits), strict=True):
        match = pattern.match(text)
        assert match and match.group(1) == match.group(2)
        assert label[1] == int(int(match.group(1)) % 3 == 0)
    assert format_boolq({"passage": "p", "question": "q", "answer": False}, random.Random(0)) == (
        "Passage: p\nQuestion: q",
        0,
    )


def test_cosmos_qa_formatting() -> None:
    row = _cosmos_rows("x", 2)[1]  # label 1, ordinary answers
    texts = {}
    rng = random.Random(0)
    for _ in range(40):
        text, label = format_cosmos_qa(row, rng)
        texts.setdefault(label, set()).add(text.rsplit("Answer: ", 1)[1])
        assert text.startswith("Context: ctx 1\nQuestion: why 1?\nAnswer: ")
    assert texts[1] == {"x answer 1.1"}
    assert texts[0] <= {"x answer 1.0", "x answer 1.2", "x answer 1.3"} and len(texts[0]) > 1

    # A true answer of "None of the above choices ." is always shown as a wrong pair (label 0), and
    # the reference draws no label coin for it: only the choice of wrong answer uses the rng.
    nota = _cosmos_rows("x", 1)[0]
    rng_a, rng_b = random.Random(3), random.Random(3)
    text, label = format_cosmos_qa(nota, rng_a)
    assert label == 0 and "None of the above" not in text
    assert text.endswith(rng_b.choice([nota[f"answer{k}"] for k in (1, 2, 3)]))

    bad = dict(row, answer1="None of the above choices")
    with pytest.raises(ValueError, match="None of the above"):
        format_cosmos_qa(bad, random.Random(0))


def test_cosmos_qa_and_anthropic_hh_load(data_dir: Path) -> None:
    cosmos = load_splits(name="cosmos_qa", n_train=None, n_test=None, seed=0, data_dir=data_dir)
    assert len(cosmos.train_a) + len(cosmos.train_b) == 40 and len(cosmos.test) == 10
    assert set(cosmos.train_a.labels + cosmos.train_b.labels) == {0, 1}

    hh = load_splits(name="anthropic_hh", n_train=30, n_test=10, seed=0, data_dir=data_dir)
    for text, label in _sample(hh) + list(zip(hh.test.texts, hh.test.labels, strict=True)):
        assert text.endswith("Assistant: good" if label else "Assistant: bad")
    assert set(hh.train_a.labels + hh.train_b.labels) == {0, 1}
    row = {"chosen": "C", "rejected": "R"}
    rng = random.Random(0)
    assert {format_anthropic_hh(row, rng) for _ in range(20)} == {("C", 1), ("R", 0)}


def test_unlabelled_split_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write_jsonl(root / "sst2" / "train.jsonl", _sst2_rows("train", 6))
    _write_jsonl(root / "sst2" / "test.jsonl", [{"sentence": "s", "label": -1, "idx": 0}])
    with pytest.raises(ValueError, match=r"test\.jsonl line 1: field 'label' is -1"):
        load_splits(name="sst2", n_train=4, n_test=None, seed=0, data_dir=root)


def test_missing_field_names_it(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write_jsonl(root / "boolq" / "train.jsonl", [{"question": "q", "passage": "p", "label": 1}] * 4)
    _write_jsonl(root / "boolq" / "test.jsonl", _boolq_rows("t", 2))
    with pytest.raises(
        ValueError, match=r"missing field 'answer' \(fields present: question, passage, label\)"
    ):
        load_splits(name="boolq", n_train=4, n_test=None, seed=0, data_dir=root)


# ------------------------------------------------------------------------------------------------------
# Split mapping and errors
# ------------------------------------------------------------------------------------------------------


def test_offline_test_split_choice(data_dir: Path) -> None:
    sst2 = load_splits(name="sst2", n_train=4, n_test=None, seed=0, data_dir=data_dir)
    assert sst2.test_source.endswith("sst2/test.jsonl") and len(sst2.test) == 12
    (data_dir / "sst2" / "test.jsonl").unlink()
    sst2 = load_splits(name="sst2", n_train=4, n_test=None, seed=0, data_dir=data_dir)
    assert sst2.test_source.endswith("sst2/validation.jsonl") and len(sst2.test) == 8

    # boolq tests on validation (as the reference); the offline dev set stored as test.jsonl is the fallback.
    boolq = load_splits(name="boolq", n_train=4, n_test=None, seed=0, data_dir=data_dir)
    assert boolq.test_source.endswith("boolq/test.jsonl")
    _write_jsonl(data_dir / "boolq" / "validation.jsonl", _boolq_rows("validation", 3))
    boolq = load_splits(name="boolq", n_train=4, n_test=None, seed=0, data_dir=data_dir)
    assert boolq.test_source.endswith("boolq/validation.jsonl") and len(boolq.test) == 3


def test_unknown_dataset_lists_choices(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; choose one of: .*sciq.*boolq.*imdb"):
        load_splits(name="nope", n_train=4, n_test=2, seed=0, data_dir=data_dir)


def test_missing_offline_split_names_path_and_available(data_dir: Path) -> None:
    (data_dir / "boolq" / "train.jsonl").unlink()
    with pytest.raises(ValueError) as info:
        load_splits(name="boolq", n_train=4, n_test=2, seed=0, data_dir=data_dir)
    message = str(info.value)
    assert "'boolq'" in message and "'train'" in message
    assert str(data_dir / "boolq" / "train.jsonl") in message
    assert "available splits: test" in message
    with pytest.raises(ValueError, match="available splits: none"):
        load_splits(name="imdb", n_train=4, n_test=2, seed=0, data_dir=data_dir)


def test_name_xor_source(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_splits(n_train=4, n_test=2, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="exactly one"):
        load_splits(
            name="sciq", source=CustomSource(path="x.jsonl"), n_train=4, n_test=2, seed=0, data_dir=None
        )


def test_hub_path_uses_reference_split_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = pytest.importorskip("datasets")
    calls: list[tuple[str, str]] = []

    def fake_load_dataset(hf_id: str, split: str) -> Any:
        calls.append((hf_id, split))
        rows = _boolq_rows(split, 12) if hf_id == "boolq" else _sst2_rows(split, 12)
        return hf.Dataset.from_list(rows)

    monkeypatch.setattr(hf, "load_dataset", fake_load_dataset)
    boolq = load_splits(name="boolq", n_train=6, n_test=4, seed=0, data_dir=None)
    assert calls == [("boolq", "train"), ("boolq", "validation")]
    assert all("validation passage" in t for t in boolq.test.texts)
    assert boolq.test_source == "hub:boolq[validation]"
    calls.clear()
    load_splits(name="sst2", n_train=6, n_test=4, seed=0, data_dir=None)
    assert calls == [("stanfordnlp/sst2", "train"), ("stanfordnlp/sst2", "validation")]

    def failing_load_dataset(hf_id: str, split: str) -> Any:
        raise ConnectionError("offline")

    monkeypatch.setattr(hf, "load_dataset", failing_load_dataset)
    with pytest.raises(RuntimeError, match="data dir"):
        load_splits(name="sciq", n_train=6, n_test=4, seed=0, data_dir=None)


# ------------------------------------------------------------------------------------------------------
# Custom files
# ------------------------------------------------------------------------------------------------------


def test_custom_jsonl_holdout(tmp_path: Path) -> None:
    label_values: list[Any] = [0, 1, True, False, "0", "1", "true", "FALSE", " True "]
    rows = [{"body": f"text {i}", "y": label_values[i % len(label_values)]} for i in range(50)]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    source = CustomSource(path=str(path), text="body", label="y")
    splits = load_splits(source=source, n_train=None, n_test=None, seed=0, data_dir=None)
    assert splits.name == str(path)
    assert len(splits.test) == 10  # 20% hold-out
    assert len(splits.train_a) == 20 and len(splits.train_b) == 20
    train_texts = set(splits.train_a.texts) | set(splits.train_b.texts)
    assert not train_texts & set(splits.test.texts)
    assert train_texts | set(splits.test.texts) == {f"text {i}" for i in range(50)}
    expected = {
        f"text {i}": int(str(label_values[i % 9]).strip().lower() in ("1", "true")) for i in range(50)
    }
    for part in (splits.train_a, splits.train_b, splits.test):
        assert all(expected[t] == lab for t, lab in zip(part.texts, part.labels, strict=True))

    sized = load_splits(source=source, n_train=10, n_test=5, seed=0, data_dir=None)
    assert (len(sized.train_a), len(sized.train_b), len(sized.test)) == (5, 5, 5)
    assert load_splits(source=source, n_train=10, n_test=5, seed=0, data_dir=None) == sized
    other = load_splits(source=source, n_train=10, n_test=5, seed=1, data_dir=None)
    assert other.test.content_hash() != sized.test.content_hash()


def test_custom_csv_with_test_path(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text(
        "\ufefftext,label,extra\n"
        + "".join(f'"row, {i}",{"true" if i % 2 else "false"},x\n' for i in range(12)),
        encoding="utf-8",
    )
    test = tmp_path / "test.csv"
    test.write_text('text,label\n"multi\nline",1\nplain,0\n', encoding="utf-8")
    splits = load_splits(
        source=CustomSource(path=str(train), test_path=str(test)),
        n_train=8,
        n_test=None,
        seed=2,
        data_dir=None,
    )
    assert sorted(zip(splits.test.texts, splits.test.labels, strict=True)) == [
        ("multi\nline", 1),
        ("plain", 0),
    ]
    for text, label in _sample(splits):
        assert label == int(text.split(", ")[1]) % 2
    assert splits.test_source == str(test)


def test_custom_bad_label_names_file_line_column(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "maybe"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3, column 'label': label 'maybe'"):
        load_splits(source=CustomSource(path=str(path)), n_train=2, n_test=1, seed=0, data_dir=None)

    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("text,label\na,1\nb,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv line 3, column 'label': label '2'"):
        load_splits(source=CustomSource(path=str(csv_path)), n_train=None, n_test=None, seed=0, data_dir=None)

    float_path = _write_jsonl(tmp_path / "float.jsonl", [{"text": "a", "label": 1.0}])
    with pytest.raises(ValueError, match=r"line 1, column 'label'"):
        load_splits(
            source=CustomSource(path=str(float_path)), n_train=None, n_test=None, seed=0, data_dir=None
        )


def test_custom_missing_column_lists_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "cols.jsonl", [{"sentence": "a", "label": 1}] * 5)
    with pytest.raises(ValueError, match=r"text column 'text' not found; columns present: sentence, label"):
        load_splits(source=CustomSource(path=str(path)), n_train=None, n_test=None, seed=0, data_dir=None)

    csv_path = tmp_path / "cols.csv"
    csv_path.write_text("review,stars\nfine,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"label column 'y' not found; columns present: review, stars"):
        load_splits(
            source=CustomSource(path=str(csv_path), text="review", label="y"),
            n_train=None,
            n_test=None,
            seed=0,
            data_dir=None,
        )


def test_custom_format_inference(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.txt", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_splits(source=CustomSource(path=str(path)), n_train=None, n_test=None, seed=0, data_dir=None)
    splits = load_splits(
        source=CustomSource(path=str(path), format="jsonl"), n_train=None, n_test=None, seed=0, data_dir=None
    )
    assert len(splits.test) == 2 and len(splits.train_a) + len(splits.train_b) == 8
    with pytest.raises(ValueError, match="not found"):
        load_splits(
            source=CustomSource(path=str(tmp_path / "absent.csv")),
            n_train=None,
            n_test=None,
            seed=0,
            data_dir=None,
        )
    with pytest.raises(ValueError, match="cannot hold out 10 test rows from 10"):
        load_splits(
            source=CustomSource(path=str(path), format="jsonl"),
            n_train=None,
            n_test=10,
            seed=0,
            data_dir=None,
        )


# ------------------------------------------------------------------------------------------------------
# Real offline data (skipped when absent)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_sciq_and_sst2() -> None:
    root = _real_data_dir()
    sciq = load_splits(name="sciq", n_train=1001, n_test=200, seed=0, data_dir=root)
    assert (len(sciq.train_a), len(sciq.train_b), len(sciq.test)) == (500, 501, 200)
    assert all(t.startswith("Q: ") and " A: " in t for t in sciq.train_a.texts)
    balance = sciq.train_a.balance()
    assert balance[0] > 150 and balance[1] > 150
    assert not set(sciq.train_a.texts) & set(sciq.train_b.texts)
    assert (
        load_splits(name="sciq", n_train=1001, n_test=200, seed=0, data_dir=root).summary() == sciq.summary()
    )

    sst2 = load_splits(name="sst2", n_train=100, n_test=None, seed=0, data_dir=root)
    assert sst2.test_source == str(root / "sst2" / "test.jsonl") and len(sst2.test) == 1821


@pytest.mark.slow
def test_real_test_only_datasets() -> None:
    root = _real_data_dir()
    # These have only a test split offline; loading them needs train, so the error must say so.
    for name in ("boolq", "cosmos_qa", "anthropic_hh"):
        with pytest.raises(ValueError, match="available splits: test"):
            load_splits(name=name, n_train=10, n_test=10, seed=0, data_dir=root)
    # Their formatters still have to handle every real row.
    for name, formatter in (
        ("boolq", format_boolq),
        ("cosmos_qa", format_cosmos_qa),
        ("anthropic_hh", format_anthropic_hh),
    ):
        rng = random.Random(0)
        with (root / name / "test.jsonl").open(encoding="utf-8") as handle:
            formatted = [formatter(json.loads(line), rng) for line in handle]
        labels = [label for _, label in formatted]
        assert set(labels) == {0, 1}, name
        assert all(text.strip() for text, _ in formatted), name


def test_module_has_single_logger() -> None:
    assert w2s_datasets.logger.name == "w2s.datasets"
