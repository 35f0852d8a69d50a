"""The datasets API on Postgres: uploads are validated line by line, bounded in size, stored
atomically, private to their team, and usable in job specs as ``upload:<id>``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.db import reset_caches
from w2s.datasets import CustomSource, load_splits


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def good_rows(n: int = 12) -> list[dict[str, Any]]:
    # Every accepted label spelling appears, so the w2s loader check below covers them all.
    labels: list[Any] = [0, 1, True, False, "0", "1", "true", "FALSE"]
    return [{"text": f"review number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def upload(client: TestClient, team: Any, content: bytes, filename: str = "data.jsonl", **fields: str) -> Any:
    return client.post(
        "/v1/datasets",
        files={"file": (filename, content, "application/octet-stream")},
        data={"name": "reviews", **fields},
        headers=team.headers,
    )


def messages(response: Any) -> list[str]:
    return [item["msg"] for item in response.json()["detail"]]


def uploads_left(service_env: dict[str, str]) -> list[Path]:
    """Upload bytes kept anywhere: the artifact store (uploads live in its files/uploads/<team>/), and
    any file, temporary or not, in the API host's uploads folder."""
    found = []
    for root in (
        Path(service_env["W2S_ARTIFACT_STORE"]) / "blobs",
        Path(service_env["W2S_ARTIFACT_STORE"]) / "files" / "uploads",
        Path(service_env["W2S_STATE_DIR"]) / "uploads",
    ):
        found += [path for path in root.rglob("*") if path.is_file()] if root.exists() else []
    return found


def worker_copy(dataset_id: str) -> Path:
    """The file a control worker reads for the upload: its node-local copy, fetched from the store."""
    from service.db import session_scope
    from service.models import Dataset
    from service.settings import get_settings
    from service.upload_files import local_copy

    with session_scope() as session:
        return local_copy(session.get_one(Dataset, dataset_id), get_settings())


def test_upload_jsonl(client: TestClient, make_team, service_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    content = jsonl(good_rows(12))
    response = upload(client, team, content)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["spec_name"] == f"upload:{dataset['id']}"
    assert dataset["format"] == "jsonl" and dataset["n_rows"] == 12 and dataset["name"] == "reviews"
    assert dataset["balance"] == {"0": 6, "1": 6, "positive_fraction": 0.5}
    assert dataset["size_bytes"] == len(content)
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()
    assert "path" not in dataset  # server paths stay private
    [stored] = uploads_left(service_env)  # one file in the team's place in the store; nothing on disk
    assert stored.name == dataset["sha256"] and stored.parent.name == team.team_id
    assert stored.read_bytes() == content
    # The ML library reads what the upload accepted, from a worker's copy.
    copy = worker_copy(dataset["id"])
    assert copy.suffix == ".jsonl" and copy.read_bytes() == content
    splits = load_splits(source=CustomSource(path=str(copy)), n_train=None, n_test=2, seed=0, data_dir=None)
    assert len(splits.train_a) + len(splits.train_b) + len(splits.test) == 12
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=team.headers).json() == dataset
    listed = client.get("/v1/datasets", headers=team.headers).json()["data"]
    assert [item["id"] for item in listed] == [dataset["id"]]


def test_upload_csv(client: TestClient, make_team, service_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    lines = ["review,y,extra"] + [f'"great, really {i}",{"true" if i % 3 else "0"},x' for i in range(10)]
    lines.insert(3, '"a review\nover two lines",1,x')
    content = ("\ufeff" + "\r\n".join(lines) + "\r\n").encode()  # a spreadsheet export: BOM and CRLF
    response = upload(client, team, content, "export.CSV", text_column="review", label_column="y")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["format"] == "csv" and dataset["n_rows"] == 11
    assert dataset["balance"]["0"] == 4 and dataset["balance"]["1"] == 7
    [stored] = uploads_left(service_env)
    copy = worker_copy(dataset["id"])
    assert copy.suffix == ".csv" and copy.read_bytes() == stored.read_bytes()
    source = CustomSource(path=str(copy), text="review", label="y")
    splits = load_splits(source=source, n_train=None, n_test=2, seed=0, data_dir=None)
    assert "a review\nover two lines" in splits.train_a.texts + splits.train_b.texts + splits.test.texts


def test_format_field_overrides_the_file_name(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert upload(client, team, jsonl(good_rows()), "data.txt", format="jsonl").status_code == 201
    response = upload(client, team, jsonl(good_rows()), "data.txt")
    assert response.status_code == 422 and "format" in response.json()["detail"]


def test_malformed_line_is_named(client: TestClient, make_team, service_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    content = jsonl(good_rows(5)) + b'{"text": "oops", "label": 1\n' + jsonl(good_rows(10)) + b"[1, 2]\n"
    response = upload(client, team, content)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [item["line"] for item in detail] == [6, 17]
    assert detail[0]["msg"].startswith("line 6: not valid JSON") and detail[0]["loc"] == ["body", "file"]
    assert "line 17: expected a JSON object" in detail[1]["msg"]
    assert uploads_left(service_env) == []  # nothing kept, not even the temporary file


def test_bad_labels_and_empty_text(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    rows = good_rows(20)
    rows[16]["label"] = "maybe"
    rows[17]["label"] = 2
    rows[18]["text"] = "  "
    assert messages(upload(client, team, jsonl(rows))) == [
        "line 17: label 'maybe' is not 0/1/true/false",
        "line 18: label 2 is not 0/1/true/false",
        "line 19: column 'text' is empty",
    ]
    csv_rows = "text,label\n" + "".join(f"row {i},{'yes' if i == 3 else i % 2}\n" for i in range(12))
    assert messages(upload(client, team, csv_rows.encode(), "d.csv")) == [
        "line 5: label 'yes' is not 0/1/true/false"
    ]


def test_at_most_twenty_errors(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    rows = [{"text": "t", "label": "nope"} for _ in range(100)]
    detail = upload(client, team, jsonl(rows)).json()["detail"]
    assert len(detail) == 20 and detail[-1]["line"] == 20


def test_missing_column_lists_present_columns(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    rows = [{"review": f"r{i}", "y": i % 2} for i in range(12)]
    first = messages(upload(client, team, jsonl(rows)))[0]
    assert first == "line 1: no column 'text'; columns present: 'review', 'y'"
    csv_content = ("review,y\n" + "".join(f"r{i},{i % 2}\n" for i in range(12))).encode()
    assert messages(upload(client, team, csv_content, "d.csv", label_column="y")) == [
        "line 1: the header has no column 'text'; columns present: review, y"
    ]
    short = ("text,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(12)) + "lonely\n").encode()
    assert messages(upload(client, team, short, "d.csv")) == [
        "line 14: the row has 1 fields but the header has 2"
    ]


def test_too_few_rows_one_label_not_utf8(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    assert messages(upload(client, team, jsonl(good_rows(9)))) == [
        "the file has 9 rows; at least 10 are needed"
    ]
    assert messages(upload(client, team, b"")) == ["the file has 0 rows; at least 10 are needed"]
    one_label = [{"text": f"t{i}", "label": 1} for i in range(12)]
    assert messages(upload(client, team, jsonl(one_label))) == [
        "every row has label 1; both labels 0 and 1 must occur"
    ]
    latin1 = jsonl(good_rows(3)) + '{"text": "café", "label": 1}\n'.encode("latin-1")
    [message] = messages(upload(client, team, latin1))
    assert message.startswith("line 4: not UTF-8 text")


def test_form_fields_are_validated(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    response = upload(client, team, jsonl(good_rows()), format="parquet")
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "format"]
    missing = client.post("/v1/datasets", data={"name": "x"}, headers=team.headers)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "file"]
    same = upload(client, team, jsonl(good_rows()), text_column="label")
    assert same.status_code == 422 and "both 'label'" in same.json()["detail"]
    assert client.post("/v1/datasets", files={"file": ("d.jsonl", b"")}).status_code == 401


@pytest.fixture
def one_mb_limit(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("W2S_MAX_UPLOAD_MB", "1")
    reset_caches()
    return 1024 * 1024


def test_oversized_upload_is_refused(
    client: TestClient,
    make_team,  # type: ignore[no-untyped-def]
    one_mb_limit: int,
    service_env: dict[str, str],
) -> None:
    team = make_team()
    row = json.dumps({"text": "x" * 1000, "label": 1}).encode() + b"\n"
    within = row * (one_mb_limit // len(row))
    assert upload(client, team, within).status_code == 422  # under the limit: read (all one label)
    # Just over: the body fits the multipart allowance, the file does not.
    response = upload(client, team, within + row)
    assert response.status_code == 413 and "limit of 1 MB" in response.json()["detail"]
    # Far over, with a Content-Length: refused before the body is read.
    assert upload(client, team, row * 3000).status_code == 413
    assert uploads_left(service_env) == []


def test_oversized_chunked_upload_is_refused(client: TestClient, make_team, one_mb_limit: int) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    boundary = "w2sboundary"

    def body():  # type: ignore[no-untyped-def]
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
        ).encode()
        for _ in range(100):  # 6.4 MB in all, without a Content-Length
            yield b"x" * 64 * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/datasets",
        content=body(),
        headers={**team.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413


def test_uploads_are_private_to_their_team(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_team(), make_team()
    dataset_id = upload(client, alice, jsonl(good_rows())).json()["id"]
    other = client.get(f"/v1/datasets/{dataset_id}", headers=bob.headers)
    missing = client.get(f"/v1/datasets/{'0' * 32}", headers=bob.headers)
    assert other.status_code == missing.status_code == 404
    assert other.json()["detail"].replace(dataset_id, "X") == missing.json()["detail"].replace("0" * 32, "X")
    assert client.get("/v1/datasets", headers=bob.headers).json()["data"] == []
    spec = {
        "dataset": {"name": f"upload:{dataset_id}", "n_train": 6, "n_test": 2},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2-medium"},
    }
    refused = client.post("/v1/jobs", json=spec, headers=bob.headers)
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "dataset", "name"] and "GET /v1/datasets" in error["msg"]


def test_job_spec_uses_an_upload(client: TestClient, make_team, service_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    dataset_id = upload(client, team, jsonl(good_rows(20)), text_column="text").json()["id"]
    spec = {
        "dataset": {"name": f"upload:{dataset_id}", "n_train": 10, "n_test": 4},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2-medium"},
        "losses": ["xent"],
    }
    response = client.post("/v1/jobs", json=spec, headers=team.headers)
    assert response.status_code == 201, response.text
    job = response.json()
    [stored] = uploads_left(service_env)
    # The job names the upload by id: no server path appears anywhere in what the team reads.
    assert job["spec"]["dataset"]["name"] == job["dataset"] == f"upload:{dataset_id}"
    assert str(stored.parent) not in response.text and service_env["W2S_STATE_DIR"] not in response.text


def test_a_long_file_name_is_shortened_and_a_long_name_refused(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    """A 250-character upload name got a 422 carrying the database's message."""
    team = make_team()
    long_file = "x" * 250 + ".jsonl"
    response = upload(client, team, jsonl(good_rows()), filename=long_file, name="")
    assert response.status_code == 201, response.text
    name = response.json()["name"]
    assert len(name) <= 200 and name.endswith("….jsonl") and name.startswith("xxx")
    odd = upload(client, team, jsonl(good_rows()), filename="C:\\Users\\me\\my   data set.jsonl", name="")
    assert odd.status_code == 201 and odd.json()["name"] == "my data set.jsonl"
    refused = upload(client, team, jsonl(good_rows()), name="n" * 250)
    assert refused.status_code == 422
    assert "name" in refused.text and "200" in refused.text and "sql" not in refused.text.lower()


def test_unfinished_upload_files_are_swept_at_start(service_env: dict[str, str]) -> None:
    """Killing the API mid-upload left a .part file forever; a live upload's fresh one is kept."""
    import os
    import time

    from api.main import create_app
    from service.settings import get_settings

    folder = get_settings().uploads_dir / "some-team"
    folder.mkdir(parents=True)
    stale, fresh, kept = folder / ".abc.1.part", folder / ".def.2.part", folder / "abc.jsonl"
    for path in (stale, fresh, kept):
        path.write_bytes(b"{}\n")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(kept, (hour_ago, hour_ago))
    with TestClient(create_app()):
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not stale.exists() and fresh.exists() and kept.exists()
