"""Uploaded datasets: bounded copy to the uploads directory, line-by-line validation, the Dataset row.

A stored upload is always loadable by ``w2s.datasets`` as a custom file (``CustomSource``): the
rules below mirror its reader, so a job never fails late on a row that the upload accepted.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput, NotFound
from service.limits import check_upload_quota
from service.models import Dataset, Job, Team, new_id
from service.pagination import newest_first, page
from service.planning import UPLOAD_PREFIX
from service.settings import Settings
from service.states import JobStatus
from service.storage import check_storage
from service.upload_files import STORED, delete_upload, store_upload, stored_path
from w2s.datasets import infer_format as library_infer_format
from w2s.datasets import parse_label
from w2s.store import ArtifactStore

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
    """Validate an uploaded file, store it in the artifact store (in the team's place, which every
    host reads: service/upload_files.py) and record it.

    Raises :class:`UploadTooLarge`, :class:`InvalidUpload` (line-numbered errors) or ``ValueError``.
    The bytes are spooled to a local temporary file (``uploads_dir/<team>/.<id>.*.part``) while they
    are checked; nothing is stored unless the whole file is valid and within the quotas.
    """
    fmt = infer_format(filename, format)
    if text_column == label_column:
        raise InvalidInput(f"text_column and label_column are both {text_column!r}; name two columns")
    dataset_id = new_id()
    folder = settings.uploads_dir / team.id
    folder.mkdir(parents=True, exist_ok=True)
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
        check_storage(session, team, settings, adding_bytes=copied.size, what="this upload")
        lock_upload(session, team.id, copied.sha256)  # a delete of these bytes waits for this commit
        store_upload(ArtifactStore(settings.store_uri), team.id, copied.sha256, str(temp))
    finally:
        temp.unlink(missing_ok=True)
    dataset = Dataset(
        id=dataset_id,
        team_id=team.id,
        name=display_name(name, filename, dataset_id),
        format=fmt,
        path=stored_path(team.id, copied.sha256),
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
    session.flush()
    return dataset


NAME_MAX = 200  # datasets.name


def display_name(name: str, filename: str, fallback: str) -> str:
    """What listings call an upload: the given name as given (the form checks it), else the file's
    own name without folders, control characters or runs of spaces, shortened in the middle (its
    suffix kept) to fit."""
    if name:
        return name
    chosen = PurePosixPath(filename.replace("\\", "/")).name
    chosen = " ".join("".join(c if c.isprintable() else " " for c in chosen).split())
    if len(chosen) > NAME_MAX:
        suffix = PurePosixPath(chosen).suffix[:20]
        chosen = chosen[: NAME_MAX - len(suffix) - 1] + "…" + suffix
    return chosen or fallback


def remove_stale_parts(uploads_dir: Path, max_age_s: float) -> int:
    """Delete unfinished upload files (``.part``) untouched for ``max_age_s``: what an API process
    killed mid-upload left behind. A live upload writes its file as bytes arrive, so it stays fresh;
    other API processes sharing the folder are not disturbed. Returns how many were removed."""
    if not uploads_dir.is_dir():
        return 0
    cutoff = time.time() - max_age_s
    removed = 0
    for part in uploads_dir.glob("*/.*.part"):
        with contextlib.suppress(FileNotFoundError):  # another process removed or finished it
            if part.stat().st_mtime < cutoff:
                part.unlink()
                removed += 1
    return removed


def lock_upload(session: Session, team_id: str, sha256: str) -> None:
    """Serialise a team's uploads and deletes of the same bytes until the transaction ends (Postgres;
    SQLite's single writer serialises them already)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"upload:{team_id}:{sha256}"}
        )


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


def delete_dataset(session: Session, *, dataset: Dataset, settings: Settings) -> None:
    """Delete an upload and its stored bytes; refused while a job that is waiting or running uses it."""
    user = session.scalar(
        select(Job.id).where(
            Job.dataset == f"{UPLOAD_PREFIX}{dataset.id}",
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
    )
    if user is not None:
        raise Conflict(f"job {user} uses this dataset and has not ended; cancel it or let it finish first")
    path, sha256 = dataset.path, dataset.sha256
    session.delete(dataset)
    session.flush()
    if not path.startswith(STORED):  # an upload from before uploads were stored
        Path(path).unlink(missing_ok=True)
        return
    # The team's uploads of the same bytes share one file (other teams have their own). Under its
    # lock, an upload of the same bytes either committed before (and is seen here) or writes the
    # file again after this delete.
    lock_upload(session, dataset.team_id, sha256)
    shared = session.scalar(select(Dataset.id).where(Dataset.sha256 == sha256, Dataset.path == path).limit(1))
    if shared is None:
        delete_upload(ArtifactStore(settings.store_uri), path)
