"""Uploaded datasets: bounded copy to the uploads directory, line-by-line validation, the Dataset row.

A stored upload is always loadable by ``w2s.datasets`` as a custom file (``CustomSource``): the
rules below mirror its reader, so a job never fails late on a row that the upload accepted.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput, NotFound
from service.limits import check_upload_quota
from service.models import Dataset, Job, Team, new_id
from service.pagination import newest_first, page
from service.planning import UPLOAD_PREFIX
from service.settings import Settings
from service.states import JobStatus
from w2s.datasets import infer_format as library_infer_format
from w2s.datasets import parse_label

Format = Literal["jsonl", "csv"]

MIB = 1024 * 1024
CHUNK = MIB
MIN_ROWS = 10
MAX_ERRORS = 20  # a file that is wrong everywhere needs one example of each problem, not a million
_BOM = codecs.BOM_UTF8
# The label spellings w2s.datasets accepts (case-insensitive, surrounding spaces ignored).


class UploadTooLarge(InvalidInput):
    """The upload is over ``max_upload_mb``."""

    def __init__(self, limit_mb: int):
        super().__init__(
            f"the file is larger than the upload limit of {limit_mb} MB; "
            "upload a smaller sample, or ask an admin to raise W2S_MAX_UPLOAD_MB"
        )


class InvalidUpload(InvalidInput):
    """The file's content is unusable; ``errors`` lists ``(line or None, message)``, at most 20."""

    def __init__(self, errors: list[tuple[int | None, str]]):
        self.errors = errors
        super().__init__("the dataset file is invalid:\n" + "\n".join(f"  {msg}" for _, msg in errors))


@dataclass
class ScanResult:
    """What validating a file found: counts of valid rows per label, and the first errors."""

    n_rows: int = 0
    n_positive: int = 0
    errors: list[tuple[int | None, str]] = field(default_factory=list)

    def error(self, line: int | None, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append((line, f"line {line}: {message}" if line is not None else message))

    @property
    def full(self) -> bool:
        return len(self.errors) >= MAX_ERRORS


def infer_format(filename: str, given: str | None) -> Format:
    """The library's rule (w2s.datasets.infer_format), so an upload is read as a job will read it."""
    try:
        return library_infer_format(filename, given)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _label(value: Any) -> int | None:
    """0 or 1, or None where w2s.datasets would refuse the value (the same parser decides)."""
    try:
        return parse_label(value)
    except ValueError:
        return None


def _check_row(
    scan: ScanResult, line: int, row: Mapping[str, Any], text_column: str, label_column: str
) -> None:
    ok = True
    for column in (text_column, label_column):
        if column not in row:
            present = ", ".join(map(repr, row)) or "none"
            scan.error(line, f"no column {column!r}; columns present: {present}")
            ok = False
    if not ok:
        return
    text = row[text_column]
    if not isinstance(text, str):
        scan.error(line, f"column {text_column!r} is {type(text).__name__} {_short(text)}, expected a string")
        ok = False
    elif not text.strip():
        scan.error(line, f"column {text_column!r} is empty")
        ok = False
    label = _label(row[label_column])
    if label is None:
        scan.error(line, f"label {_short(row[label_column])} is not 0/1/true/false")
        ok = False
    if ok:
        scan.n_rows += 1
        scan.n_positive += label or 0


def _scan_jsonl(path: Path, text_column: str, label_column: str, scan: ScanResult) -> None:
    # Text mode, as w2s reads it: the same newline handling gives the same line numbers.
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if scan.full:
                return
            if not text.strip():
                continue  # w2s skips blank lines too
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                scan.error(line, f"not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(record, dict):
                scan.error(
                    line,
                    f"expected a JSON object like {{{json.dumps(text_column)}: ..., "
                    f"{json.dumps(label_column)}: 0}}, got {type(record).__name__}",
                )
                continue
            _check_row(scan, line, record, text_column, label_column)


def _scan_csv(path: Path, text_column: str, label_column: str, scan: ScanResult) -> None:
    # DictReader, as w2s reads the file: same header handling, blank lines skipped, None for short rows.
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            header = list(reader.fieldnames or [])
        except csv.Error as error:
            scan.error(1, f"malformed CSV header ({error})")
            return
        if not header:
            scan.error(None, "the file is empty; a CSV upload needs a header row naming its columns")
            return
        missing = [column for column in (text_column, label_column) if column not in header]
        for column in missing:
            scan.error(1, f"the header has no column {column!r}; columns present: {', '.join(header)}")
        if missing:
            return
        while not scan.full:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                # The reader cannot resynchronise after a broken quote or a NUL byte.
                scan.error(reader.line_num, f"malformed CSV ({error})")
                return
            # line_num is where the row ends; a quoted field may span lines.
            fields = sum(value is not None for key, value in row.items() if key is not None)
            if fields < len(header):  # DictReader fills the missing fields with None
                scan.error(reader.line_num, f"the row has {fields} fields but the header has {len(header)}")
                continue
            _check_row(scan, reader.line_num, row, text_column, label_column)


def scan_file(path: Path, fmt: Format, *, text_column: str, label_column: str) -> ScanResult:
    """Validate every row of a UTF-8 file; whole-file rules (row count, both labels) come last."""
    scan = ScanResult()
    if fmt == "jsonl":
        _scan_jsonl(path, text_column, label_column, scan)
    else:
        _scan_csv(path, text_column, label_column, scan)
    if not scan.errors:
        if scan.n_rows < MIN_ROWS:
            scan.error(None, f"the file has {scan.n_rows} rows; at least {MIN_ROWS} are needed")
        if scan.n_rows and scan.n_positive in (0, scan.n_rows):
            only = 1 if scan.n_positive else 0
            scan.error(None, f"every row has label {only}; both labels 0 and 1 must occur")
    return scan


@dataclass
class _Copied:
    size: int
    sha256: str


def _copy_bounded(source: BinaryIO, target: BinaryIO, limit: int, limit_mb: int) -> _Copied:
    """Copy in chunks, refusing more than ``limit`` bytes and anything that is not UTF-8."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    lines = 0
    first = True
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            break
        if first and chunk.startswith(_BOM):
            # Spreadsheet exports start with a BOM; w2s's JSONL reader would choke on it.
            chunk = chunk[len(_BOM) :]
        first = False
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge(limit_mb)
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as error:
            line = lines + error.object[: error.start].count(b"\n") + 1
            raise InvalidUpload(
                [(line, f"line {line}: not UTF-8 text ({error.reason}); save the file as UTF-8")]
            ) from None
        lines += chunk.count(b"\n")
        digest.update(chunk)
        target.write(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        line = lines + 1
        raise InvalidUpload([(line, f"line {line}: the file ends inside a UTF-8 character")]) from None
    return _Copied(size, digest.hexdigest())


def create_dataset(
    session: Session,
    *,
    team: Team,
    settings: Settings,
    source: BinaryIO,
    filename: str,
    name: str = "",
    text_column: str = "text",
    label_column: str = "label",
    format: str | None = None,
) -> Dataset:
    """Validate and store an uploaded file as ``uploads_dir/<team>/<id>.<ext>`` and record it.

    Raises :class:`UploadTooLarge`, :class:`InvalidUpload` (line-numbered errors) or ``ValueError``.
    The file appears under its final name only once it is complete and valid (write, then rename).
    """
    fmt = infer_format(filename, format)
    if text_column == label_column:
        raise InvalidInput(f"text_column and label_column are both {text_column!r}; name two columns")
    dataset_id = new_id()
    folder = settings.uploads_dir / team.id
    folder.mkdir(parents=True, exist_ok=True)
    final = (folder / f"{dataset_id}.{fmt}").resolve()
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{dataset_id}.", suffix=".part")
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as target:
            copied = _copy_bounded(source, target, settings.max_upload_mb * MIB, settings.max_upload_mb)
            target.flush()
            os.fsync(target.fileno())
        scan = scan_file(temp, fmt, text_column=text_column, label_column=label_column)
        if scan.errors:
            raise InvalidUpload(scan.errors)
        check_upload_quota(session, team, settings, copied.size)
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    dataset = Dataset(
        id=dataset_id,
        team_id=team.id,
        name=name or Path(filename).name or dataset_id,
        format=fmt,
        path=str(final),
        text_column=text_column,
        label_column=label_column,
        n_rows=scan.n_rows,
        balance={
            "0": scan.n_rows - scan.n_positive,
            "1": scan.n_positive,
            "positive_fraction": round(scan.n_positive / scan.n_rows, 4),
        },
        size_bytes=copied.size,
        sha256=copied.sha256,
    )
    session.add(dataset)
    try:
        session.flush()
    except BaseException:
        final.unlink(missing_ok=True)  # no row points at it
        raise
    return dataset


def get_dataset(session: Session, *, team_id: str, dataset_id: str) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.team_id == team_id))
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_datasets(
    session: Session, *, team_id: str, limit: int = 50, cursor: str | None = None
) -> tuple[list[Dataset], str | None]:
    """The team's uploads, newest first, keyset-paginated like the jobs list."""
    query = newest_first(
        select(Dataset).where(Dataset.team_id == team_id), Dataset, limit=limit, cursor=cursor
    )
    return page(session.scalars(query).all(), limit)


def delete_dataset(session: Session, *, dataset: Dataset) -> None:
    """Delete an upload and its file; refused while a job that is waiting or running uses it."""
    user = session.scalar(
        select(Job.id).where(
            Job.dataset == f"{UPLOAD_PREFIX}{dataset.id}",
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
    )
    if user is not None:
        raise Conflict(f"job {user} uses this dataset and has not ended; cancel it or let it finish first")
    path = Path(dataset.path)
    session.delete(dataset)
    session.flush()
    path.unlink(missing_ok=True)
