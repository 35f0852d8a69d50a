"""Bad input through the API on Postgres: malformed uploads, dataset paths that leave the allowed
directories, model code that would run without permission, absurd hyperparameters and bodies that
are not a JSON object. Each is refused with a 4xx whose JSON body names the field and the fix;
nothing is a server error. (The basic upload and spec errors are in test_api_datasets.py,
test_api_jobs.py and tests/test_spec.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import MAX_BODY_BYTES
from w2s.spec import MAX_EXAMPLES, MAX_SEED


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 40, "n_test": 20},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2-medium"},
        "losses": ["xent"],
        "seeds": [0],
    }
    body.update(overrides)
    return body


def errors_by_field(response: Any) -> dict[str, str]:
    """The 422's problems as {"weak.lr": message}, dropping the leading "body"."""
    assert response.status_code == 422, response.text
    return {".".join(map(str, item["loc"][1:])): item["msg"] for item in response.json()["detail"]}


def upload(client: TestClient, team: Any, content: bytes, filename: str = "data.jsonl", **fields: str) -> Any:
    return client.post(
        "/v1/datasets",
        files={"file": (filename, content, "application/octet-stream")},
        data=fields,
        headers=team.headers,
    )


def good_jsonl(n: int = 12) -> bytes:
    return "".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(n)).encode()


# ---------------------------------------------------------------------------------------------
# Uploads


def test_binary_garbage_is_refused_with_its_line(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    for filename in ("image.jsonl", "image.csv"):
        response = upload(client, team, png, filename)
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert problem["loc"] == ["body", "file"] and problem["line"] == 1
        assert "not UTF-8" in problem["msg"] and "save the file as UTF-8" in problem["msg"]
    # Valid UTF-8 but not JSON at all: every line is named, up to the cap.
    noise = b"\x00\x01\x02 garbage\n" * 30
    detail = upload(client, team, noise).json()["detail"]
    assert len(detail) == 20 and all("not valid JSON" in item["msg"] for item in detail)


def test_csv_with_bad_quoting_names_the_line(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    rows = "".join(f"row {i},{i % 2}\n" for i in range(12))
    unterminated = f'text,label\n{rows}"never closed,1\nmore,0\n'.encode()
    response = upload(client, team, unterminated, "d.csv")
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    # The open quote (line 14) swallows the rest of the file into one field of a short row.
    assert problem["loc"] == ["body", "file"] and problem["line"] >= 14
    assert problem["msg"].startswith(f"line {problem['line']}:") and "fields" in problem["msg"]


def test_a_body_that_is_not_a_multipart_upload(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    as_json = client.post("/v1/datasets", json={"file": "data.jsonl"}, headers=team.headers)
    assert as_json.status_code == 422
    assert as_json.json()["detail"][0]["loc"] == ["body", "file"]
    assert "multipart/form-data" in as_json.json()["detail"][0]["msg"]
    no_boundary = client.post(
        "/v1/datasets", content=b"garbage", headers={**team.headers, "Content-Type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["detail"]


def test_nul_characters_are_bad_input_not_an_outage(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    # Regression: Postgres refuses NUL in text, which used to surface as a 503 "database unavailable".
    team = make_team()
    responses = [
        upload(client, team, good_jsonl(), name="re\x00views"),
        client.post("/v1/jobs", json={**spec(), "name": "a\x00b"}, headers=team.headers),
        client.get("/v1/jobs", params={"name": "a\x00b"}, headers=team.headers),
        client.get("/v1/jobs/a%00b", headers=team.headers),
    ]
    for response in responses:
        assert response.status_code == 422, response.text
        # A name field names the character (api/schemas.py SafeName); other values get the general answer.
        assert "NUL" in response.text
    assert client.get("/v1/datasets", headers=team.headers).json()["data"] == []


# ---------------------------------------------------------------------------------------------
# Dataset paths


@pytest.fixture
def data_dir(service_env: dict[str, str]) -> Path:
    return Path(service_env["W2S_DATA_DIR"])


def test_paths_that_leave_the_data_directory(
    client: TestClient, make_team, data_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(good_jsonl())
    (data_dir / "escape.jsonl").symlink_to(secret)  # inside by name, outside once resolved
    (data_dir / "link-dir").symlink_to(tmp_path)
    inside = data_dir / "sst2" / "train.jsonl"
    for path in (
        "/etc/passwd",
        f"{data_dir}/../secret.jsonl",
        f"{data_dir}/sst2/../../secret.jsonl",
        "../../etc/passwd",
        str(data_dir / "escape.jsonl"),
        str(data_dir / "link-dir" / "secret.jsonl"),
    ):
        for field in ("path", "test_path"):
            name = {"path": str(inside), field: path, "text": "sentence"}
            fields = errors_by_field(
                client.post("/v1/jobs", json=spec(dataset={"name": name}), headers=team.headers)
            )
            assert list(fields) == [f"dataset.name.{field}"], (path, fields)
            assert "outside the allowed data directories" in fields[f"dataset.name.{field}"]
            assert "POST /v1/datasets" in fields[f"dataset.name.{field}"]
    name = {"path": str(inside), "text": "sentence"}
    assert client.post("/v1/jobs", json=spec(dataset={"name": name}), headers=team.headers).status_code == 201


def test_another_teams_upload_cannot_be_used_by_id_or_by_path(
    client: TestClient,
    make_team,  # type: ignore[no-untyped-def]
    service_env: dict[str, str],
) -> None:
    # Regression: every team's uploads were an allowed root, so a path into another team's
    # folder passed the check that upload:<id> refuses.
    alice, bob = make_team(), make_team()
    dataset_id = upload(client, alice, good_jsonl()).json()["id"]
    from test_api_datasets import worker_copy

    stored = worker_copy(dataset_id)  # the file on this host that holds alice's upload
    by_path = spec(dataset={"name": {"path": str(stored)}})
    fields = errors_by_field(client.post("/v1/jobs", json=by_path, headers=bob.headers))
    assert "outside the allowed data directories" in fields["dataset.name.path"]
    by_id = spec(dataset={"name": f"upload:{dataset_id}"})
    assert (
        "GET /v1/datasets"
        in errors_by_field(client.post("/v1/jobs", json=by_id, headers=bob.headers))["dataset.name"]
    )
    sweep = {
        "dataset": {"name": f"upload:{dataset_id}"},
        "weak_models": ["gpt2"],
        "strong_models": ["gpt2-medium"],
    }
    assert "dataset.name" in errors_by_field(client.post("/v1/sweeps", json=sweep, headers=bob.headers))
    # Alice uses hers by id; its bytes live in the artifact store, and a host's cached copy of them
    # is no data directory, for her either.
    assert client.post("/v1/jobs", json=by_id, headers=alice.headers).status_code == 201
    assert client.post("/v1/jobs", json=by_path, headers=alice.headers).status_code == 422


# ---------------------------------------------------------------------------------------------
# Model code


def test_trust_remote_code_on_either_model_needs_permission(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    both = spec(
        weak={"model": "gpt2", "trust_remote_code": True}, strong={"model": "x/y", "trust_remote_code": True}
    )
    fields = errors_by_field(client.post("/v1/jobs", json=both, headers=team.headers))
    assert set(fields) == {"weak.trust_remote_code", "strong.trust_remote_code"}
    assert all("ask an admin" in message for message in fields.values())
    sweep = {
        "dataset": {"name": "sst2", "n_train": 40},
        "weak_models": ["gpt2"],
        "strong_models": [{"model": "gpt2-medium", "trust_remote_code": True}],
    }
    assert "strong_models.0.trust_remote_code" in errors_by_field(
        client.post("/v1/sweeps", json=sweep, headers=team.headers)
    )


def test_a_local_model_whose_config_runs_code(
    client: TestClient, make_team, tiny_gpt2: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # A directory whose config maps AutoModel to its own modeling_*.py: loading it executes that file.
    remote = tmp_path / "remote-model"
    remote.mkdir()
    config = json.loads((tiny_gpt2 / "config.json").read_text())
    config["auto_map"] = {
        "AutoModel": "modeling_evil.EvilModel",
        "AutoConfig": "configuration_evil.EvilConfig",
    }
    (remote / "config.json").write_text(json.dumps(config))
    team, trusted = make_team(), make_team(allow_trust_remote_code=True)
    body = spec(weak={"model": str(tiny_gpt2)}, strong={"model": str(remote)})
    fields = errors_by_field(client.post("/v1/jobs", json=body, headers=team.headers))
    assert list(fields) == ["strong.model"]
    assert "auto_map" in fields["strong.model"] and "ask an admin" in fields["strong.model"]
    # A team allowed to run model code must still say so in the spec.
    fields = errors_by_field(client.post("/v1/jobs", json=body, headers=trusted.headers))
    assert "set strong.trust_remote_code to true" in fields["strong.model"]
    body["strong"]["trust_remote_code"] = True
    assert client.post("/v1/jobs", json=body, headers=trusted.headers).status_code == 201
    # The plain model next to it is fine for everyone.
    assert (
        client.post("/v1/jobs", json=spec(weak={"model": str(tiny_gpt2)}), headers=team.headers).status_code
        == 201
    )


# ---------------------------------------------------------------------------------------------
# Hyperparameters and sizes

ABSURD = [
    # (where in the spec, the value, the field the error names, a word of the fix)
    ("weak", {"lr": 0}, "weak.lr", "greater than 0"),
    ("weak", {"lr": 1.5}, "weak.lr", "less than or equal to 1"),
    ("strong", {"epochs": 0}, "strong.epochs", "greater than 0"),
    ("strong", {"epochs": 1e9}, "strong.epochs", "less than or equal to 1000"),
    ("weak", {"batch_size": 0}, "weak.batch_size", "greater than or equal to 1"),
    ("weak", {"batch_size": 10**6}, "weak.batch_size", "less than or equal to 4096"),
    ("weak", {"batch_size": 32, "minibatch_size": 5}, "weak", "must divide batch_size"),
    ("weak", {"max_length": 0}, "weak.max_length", "greater than or equal to 8"),
    ("weak", {"max_length": 10**7}, "weak.max_length", "less than or equal to 32768"),
    ("strong", {"lora_rank": 0}, "strong.lora_rank", "greater than or equal to 1"),
    ("strong", {"warmup_frac": 2}, "strong.warmup_frac", "less than or equal to 1"),
    ("strong", {"lora_alpha": 1e12}, "strong.lora_alpha", "less than or equal to 10000"),
    ("transfer", {"eval_every": 10**12}, "transfer.eval_every", "less than or equal to"),
    ("dataset", {"n_train": 10**12}, "dataset.n_train", f"less than or equal to {MAX_EXAMPLES}"),
    ("dataset", {"n_test": 10**12}, "dataset.n_test", f"less than or equal to {MAX_EXAMPLES}"),
    ("dataset", {"seed": 2**40}, "dataset.seed", f"less than or equal to {MAX_SEED}"),
    ("weak", {"model": "x" * 5000}, "weak.model", "at most 1000 characters"),
]


@pytest.mark.parametrize(("part", "values", "field", "fix"), ABSURD, ids=[a[2] + str(a[1]) for a in ABSURD])
def test_absurd_hyperparameters_name_the_field(
    client: TestClient, make_team, part: str, values: dict[str, Any], field: str, fix: str
) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    base = spec()
    section = base.get(part, {})
    body = spec(**{part: {**section, **values}})
    fields = errors_by_field(client.post("/v1/jobs", json=body, headers=team.headers))
    assert list(fields) == [field] and fix in fields[field]


def test_absurd_lists_and_loss_parameters(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()

    def refused(**overrides: Any) -> dict[str, str]:
        return errors_by_field(client.post("/v1/jobs", json=spec(**overrides), headers=team.headers))

    assert "at most 100 items" in refused(seeds=list(range(10**4)))["seeds"]
    # Regression: a seed past 32 bits reached the database and came back as a 503.
    assert f"from 0 to {MAX_SEED}" in refused(seeds=[0, 2**40])["seeds"]
    assert (
        "aux_coef must be in [0.0, 1.0]" in refused(losses=[{"name": "logconf", "aux_coef": -1}])["losses.0"]
    )
    assert "warmup_frac" in refused(losses=[{"name": "logconf", "warmup_frac": 2}])["losses.0"]
    many = [{"name": "logconf", "aux_coef": i / 100} for i in range(60)]
    assert "at most 50 items" in refused(losses=many)["losses"]


@pytest.mark.parametrize("model", ["~nobody-at-all/model", "/" + "m" * 300 + "/model", "./" + "m" * 900])
def test_unusual_model_paths_are_a_422(client: TestClient, make_team, model: str) -> None:  # type: ignore[no-untyped-def]
    # Regression: "~unknown-user" raised RuntimeError and an over-long name OSError: both were 500s.
    team = make_team()
    fields = errors_by_field(client.post("/v1/jobs", json=spec(weak={"model": model}), headers=team.headers))
    # Outside the roots, or (the long relative one, resolved against a root) not there.
    assert "under the model roots" in fields["weak.model"] or "does not exist" in fields["weak.model"]
    sweep = {"dataset": {"name": "sst2"}, "weak_models": [model], "strong_models": ["gpt2-medium"]}
    assert "weak_models.0.model" in errors_by_field(
        client.post("/v1/sweeps", json=sweep, headers=team.headers)
    )


def test_booleans_are_not_numbers(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    # Found by schemathesis: a JSON false was taken as priority 0 or seed 0, and 0 as false.
    team = make_team()
    assert "priority" in errors_by_field(
        client.post("/v1/jobs", json={**spec(), "priority": False}, headers=team.headers)
    )
    sweep = {
        "dataset": {"name": "sst2"},
        "weak_models": ["gpt2"],
        "strong_models": ["gpt2"],
        "seeds": [False],
    }
    assert "seeds.0" in errors_by_field(client.post("/v1/sweeps", json=sweep, headers=team.headers))
    admin = {"Authorization": f"Bearer {os.environ['W2S_ADMIN_KEY']}"}
    team_body = {"name": "t", "allow_trust_remote_code": 0}
    assert "allow_trust_remote_code" in errors_by_field(
        client.post("/v1/teams", json=team_body, headers=admin)
    )


# ---------------------------------------------------------------------------------------------
# Bodies


def test_bodies_that_are_not_a_json_object(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    text = json.dumps(spec())
    cases = [
        ({"Content-Type": "application/json"}, b"dataset: sst2", "not valid JSON"),
        ({"Content-Type": "application/json"}, text[:-3].encode(), "not valid JSON"),
        ({"Content-Type": "text/plain"}, text.encode(), "must be a JSON object"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"dataset=sst2", "must be a JSON object"),
        ({"Content-Type": "application/json"}, b"[1, 2]", "must be a JSON object"),
    ]
    for headers, content, expected in cases:
        response = client.post("/v1/jobs", content=content, headers={**team.headers, **headers})
        assert response.status_code == 422, (headers, content, response.text)
        [problem] = response.json()["detail"]
        assert problem["loc"][0] == "body" and expected in problem["msg"], problem
        assert "Content-Type: application/json" in problem["msg"]
    latin1 = client.post(
        "/v1/jobs",
        content='{"name": "café"}'.encode("latin-1"),
        headers={**team.headers, "Content-Type": "application/json"},
    )
    assert latin1.status_code == 400 and "not UTF-8" in latin1.json()["detail"]


def test_deeply_nested_json(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    depth = 100_000
    for content in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        response = client.post(
            "/v1/jobs", content=content.encode(), headers={**team.headers, "Content-Type": "application/json"}
        )
        assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]
    # Nesting that parses is refused by the spec, naming the field.
    nested: Any = 1
    for _ in range(50):
        nested = {"x": nested}
    fields = errors_by_field(client.post("/v1/jobs", json=spec(transfer=nested), headers=team.headers))
    assert "transfer.x" in fields and "allowed fields" in fields["transfer.x"]


def test_huge_bodies_are_refused_before_they_are_read(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    team = make_team()
    huge = {**spec(), "name": "n", "padding": "x" * (MAX_BODY_BYTES + 1)}
    for path in ("/v1/jobs", "/v1/sweeps", "/v1/teams"):
        response = client.post(path, json=huge, headers=team.headers)
        assert response.status_code == 413, path
        assert "POST /v1/datasets" in response.json()["detail"]

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):  # 2.5 MB without a Content-Length
            yield b" " * 64 * 1024

    streamed = client.post(
        "/v1/jobs", content=chunks(), headers={**team.headers, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    # Under the limit the body is read as usual.
    assert (
        client.post("/v1/jobs", json={**spec(), "name": "n" * 100}, headers=team.headers).status_code == 201
    )


def test_a_unicode_digit_as_a_field_name_is_a_422(client: TestClient, make_team) -> None:  # type: ignore[no-untyped-def]
    """Found by schemathesis: {"¹": null} made the error's location int("¹") (a digit to
    str.isdigit, not to int) and the answer a 500."""
    team = make_team()
    response = client.post("/v1/jobs", json={"¹": None}, headers=team.headers)
    assert response.status_code == 422
    assert ["body", "¹"] in [item["loc"] for item in response.json()["detail"]]
    sweep = {
        "dataset": {"name": "sst2"},
        "weak_models": [{"model": "gpt2", "²": 1}],
        "strong_models": ["gpt2"],
    }
    assert client.post("/v1/sweeps", json=sweep, headers=team.headers).status_code == 422
