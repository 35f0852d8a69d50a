"""The train/test overlap check at scale: realistic and hostile uploads, before and after issue 28 (6).

The overlap check is the three containment searches ``w2s.splits.prepare_seed_data`` runs on one
seed's rows (train rows containing a test row, both halves; half-B rows inside a half-A row). Each
shape is cut as an upload without a test file is: a seeded fifth held out as the test set, the rest
split into halves A and B. Shapes:

- ``sst2``: SST-2's train sentences (../shared/data, else sentences generated like tests/helpers.py's);
  beyond its 30,000 rows, the same sentences with their words shuffled (seeded).
- ``imdb``: IMDB reviews (about 230 words each), the same way; 10k and 100k rows only: a million
  reviews are 1.3 GB of text, 26 times the upload limit.
- ``shared_longest_word``: the issue's upload: every row's longest word is the same
  ("incomprehensibilities film 123", "... film 123 again"), so the old search, which indexed each row
  under its longest word, compared every row with every other.
- ``nested``: rows that all contain one another ("w", "w w", ... twenty deep, repeated): every row
  sits inside every row at least as long.
- ``tiny_vocabulary``: twenty random words of four ("a c d a b ..."): every run of three words is
  in every large enough set of rows, so the new search's filter keeps every row and its automaton
  holds them all, its own worst case (1,000,000 such rows are 40 MB, under the upload limit).

Every measurement runs in a fork of this process (so its peak memory can be read: the fork's peak
resident size above what it started with) under a time limit of ``--old-limit`` seconds (60) for the
old search (tests/overlap_reference.py, kept as the reference); once the old search passes it on a
shape, the larger sizes of that shape are not tried. Where both finish, their answers are compared.
Then ``prepare_seed_data`` (what planning a job computes per seed: the draw, every row tokenised for
its length, the overlap check) is timed on JSONL files of the sst2 and shared-longest-word shapes
with a tiny BERT tokenizer, with the new and the old search.

    python bench/overlap_scale.py                   # 10k, 100k, 1,000,000 rows (about 10 minutes)
    python bench/overlap_scale.py --quick           # 10k and 100k rows
    python bench/overlap_scale.py --json /tmp/overlap.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import overlap_reference  # noqa: E402

import w2s.splits  # noqa: E402
from helpers import build_tiny_bert, make_sentence, shared_data_dir  # noqa: E402
from w2s import overlap  # noqa: E402

LONGEST_WORD = "incomprehensibilities"
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
MAX_IMDB_ROWS = 100_000
Search = tuple[Callable[[Sequence[str], Sequence[str]], list[bool]], Callable[..., list[bool]]]
NEW: Search = (overlap.contained_in_any, overlap.containing_any)
OLD: Search = (overlap_reference.reference_contained_in_any, overlap_reference.reference_containing_any)


# -- shapes ----------------------------------------------------------------------------------------


def _real_texts(dataset: str, field: str) -> list[str] | None:
    data_dir = shared_data_dir()
    path = data_dir / dataset / "train.jsonl" if data_dir else None
    if path is None or not path.is_file():
        return None
    with open(path) as handle:
        return [json.loads(line)[field] for line in handle]


def _grown(base: list[str], n: int) -> list[str]:
    """``n`` rows: ``base`` as it is, then again and again with each row's words shuffled (seeded)."""
    rng = random.Random(0)
    rows = base[:n]
    while len(rows) < n:
        for text in base[: n - len(rows)]:
            words = text.split()
            rng.shuffle(words)
            rows.append(" ".join(words))
    return rows


def sst2_rows(n: int) -> list[str]:
    base = _real_texts("sst2", "sentence")
    if base is None:
        rng = random.Random(0)
        base = [make_sentence(rng, rng.randint(0, 1)) for _ in range(30_000)]
    return _grown(base, n)


def imdb_rows(n: int) -> list[str] | None:
    base = _real_texts("imdb", "text")
    return None if base is None or n > MAX_IMDB_ROWS else _grown(base, n)


def shared_longest_word_rows(n: int) -> list[str]:
    return [f"{LONGEST_WORD} film {i // 2}" + (" again" if i % 2 else "") for i in range(n)]


def nested_rows(n: int) -> list[str]:
    return ["w " * (1 + i % 20) for i in range(n)]


def tiny_vocabulary_rows(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choices("abcd", k=20)) for _ in range(n)]


SHAPES: dict[str, Callable[[int], list[str] | None]] = {
    "sst2": sst2_rows,
    "imdb": imdb_rows,
    "shared_longest_word": shared_longest_word_rows,
    "nested": nested_rows,
    "tiny_vocabulary": tiny_vocabulary_rows,
}


def split_like_an_upload(rows: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(half A, half B, test): a seeded fifth held out, the rest halved, as w2s.datasets does."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    n_test = len(rows) // 5
    test = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test:]]
    return train[::2], train[1::2], test


# -- measuring -------------------------------------------------------------------------------------


def overlap_check(search: Search, a: list[str], b: list[str], test: list[str]) -> list[list[bool]]:
    """The three searches of w2s.splits.prepare_seed_data, in its order: which rows go."""
    contained_in_any, containing_any = search
    a_gone = containing_any(a, test)
    b_gone = containing_any(b, test)
    b_left = [text for text, gone in zip(b, b_gone, strict=True) if not gone]
    a_left = [text for text, gone in zip(a, a_gone, strict=True) if not gone]
    return [a_gone, b_gone, contained_in_any(b_left, a_left)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fork(work: Callable[[], Any], limit_s: float) -> dict[str, Any]:
    """Run ``work`` in a fork of this process: its seconds, the fork's peak memory above what it
    started with, and its result; or ``{"timed_out": limit_s}`` once it runs past the limit."""
    receive, send = multiprocessing.Pipe(duplex=False)

    def child() -> None:
        start_mb = _peak_mb()
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        send.send({"s": round(seconds, 3), "extra_mb": round(_peak_mb() - start_mb), "result": result})

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    if not receive.poll(limit_s):
        process.kill()
        process.join()
        return {"timed_out": limit_s}
    measured = receive.recv()
    process.join()
    return measured


def overlap_figures(sizes: Sequence[int], old_limit_s: float, new_limit_s: float) -> list[dict[str, Any]]:
    rows_out: list[dict[str, Any]] = []
    for shape, make in SHAPES.items():
        old_gave_up = False
        for n in sizes:
            rows = make(n)
            if rows is None:
                continue
            a, b, test = split_like_an_upload(rows)
            new = in_fork(lambda a=a, b=b, test=test: overlap_check(NEW, a, b, test), new_limit_s)
            entry: dict[str, Any] = {
                "shape": shape,
                "rows": n,
                "words": sum(len(text.split()) for text in rows),
                "mb": round(sum(len(text.encode()) + 1 for text in rows) / 1e6, 1),
                "new_s": new.get("s"),
                "new_extra_mb": new.get("extra_mb"),
            }
            if "result" in new:
                entry["removed"] = sum(map(sum, new["result"]))
            if old_gave_up:
                entry["old_s"], entry["old_note"] = None, f"not tried (over {old_limit_s:.0f} s before)"
            else:
                old = in_fork(lambda a=a, b=b, test=test: overlap_check(OLD, a, b, test), old_limit_s)
                entry["old_s"] = old.get("s")
                if "timed_out" in old:
                    entry["old_note"] = f"over {old_limit_s:.0f} s (stopped)"
                    old_gave_up = True
                elif "result" in new:
                    entry["same_rows"] = old["result"] == new["result"]
            print(json.dumps(entry), flush=True)
            rows_out.append(entry)
    return rows_out


def prepare_figures(sizes: Sequence[int], old_limit_s: float, new_limit_s: float) -> list[dict[str, Any]]:
    """``prepare_seed_data`` on an uploaded-like JSONL file (seeded 20% hold-out, as an upload
    without a test file), with the new search and with the old one patched in."""
    from w2s.spec import parse_spec

    folder = Path(tempfile.mkdtemp(prefix="w2s_overlap_scale_"))
    model = build_tiny_bert(folder / "tiny-bert")
    options = {"max_length": 128, "truncation": "right"}
    figures: list[dict[str, Any]] = []
    for shape in ("sst2", "shared_longest_word"):
        old_gave_up = False
        for n in sizes:
            rows = SHAPES[shape](n)
            assert rows is not None
            path = folder / f"{shape}-{n}.jsonl"
            with open(path, "w") as handle:
                for i, text in enumerate(rows):
                    handle.write(json.dumps({"text": text, "label": i % 2}) + "\n")
            spec = parse_spec(
                {
                    "dataset": {"name": {"path": str(path)}},
                    "weak": {"model": str(model), **options},
                    "strong": {"model": str(model), **options},
                    "losses": ["xent"],
                    "seeds": [0],
                }
            )

            def prepare(search: Search, spec: Any = spec) -> dict[str, Any]:
                w2s.splits.contained_in_any, w2s.splits.containing_any = search
                data = w2s.splits.prepare_seed_data(spec, 0, None)
                return {name: counts.to_dict() for name, counts in data.counts.items()}

            new = in_fork(lambda prepare=prepare: prepare(NEW), new_limit_s)
            entry: dict[str, Any] = {"shape": shape, "rows": n, "new_s": new.get("s")}
            entry["counts"] = new.get("result")
            if old_gave_up:
                entry["old_s"], entry["old_note"] = None, f"not tried (over {old_limit_s:.0f} s before)"
            else:
                old = in_fork(lambda prepare=prepare: prepare(OLD), old_limit_s)
                entry["old_s"] = old.get("s")
                if "timed_out" in old:
                    entry["old_note"] = f"over {old_limit_s:.0f} s (stopped)"
                    old_gave_up = True
                else:
                    entry["same_rows"] = old["result"] == new.get("result")
            path.unlink()
            print(json.dumps(entry), flush=True)
            figures.append(entry)
    return figures


def growth(figures: list[dict[str, Any]]) -> dict[str, float]:
    """Per shape: the exponent of the new search's time in the rows between its two largest sizes
    (1: linear, 2: quadratic); shapes with one size, or too fast to tell (< 0.05 s), are left out."""
    exponents: dict[str, float] = {}
    for shape in SHAPES:
        timed = [(f["rows"], f["new_s"]) for f in figures if f["shape"] == shape and f["new_s"]]
        if len(timed) >= 2 and timed[-2][1] >= 0.05:
            (n0, t0), (n1, t1) = timed[-2:]
            exponents[shape] = round(math.log(t1 / t0) / math.log(n1 / n0), 2)
    return exponents


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10k and 100k rows only")
    parser.add_argument("--old-limit", type=float, default=60.0, help="seconds the old search may take")
    parser.add_argument("--new-limit", type=float, default=600.0, help="seconds the new search may take")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    figures: dict[str, Any] = {"quick": args.quick, "old_limit_s": args.old_limit}
    print("the overlap check (three searches, as prepare_seed_data runs them)", flush=True)
    figures["overlap"] = overlap_figures(sizes, args.old_limit, args.new_limit)
    print("prepare_seed_data (draw, token lengths, overlap check) with a tiny BERT tokenizer", flush=True)
    figures["prepare"] = prepare_figures(sizes, args.old_limit, args.new_limit)
    figures["growth_exponent"] = growth(figures["overlap"])
    answers = [f["same_rows"] for f in figures["overlap"] + figures["prepare"] if "same_rows" in f]
    finished = all(f["new_s"] is not None for f in figures["overlap"] + figures["prepare"])
    figures["goals"] = {
        "new and old remove the same rows wherever both finish": all(answers),
        f"the new search finishes every size within {args.new_limit:.0f} s": finished,
        "near-linear: time grows at most as rows^1.3 between the two largest sizes": all(
            exponent <= 1.3 for exponent in figures["growth_exponent"].values()
        ),
    }
    print(json.dumps({"growth_exponent": figures["growth_exponent"], "goals": figures["goals"]}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(figures["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
