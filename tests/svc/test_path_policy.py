"""One path policy (issue 18, service/paths.py): a path a request names is resolved fully, symlinks
included, relative ones against W2S_PATH_BASE and the roots but never a process's working
directory, and must lie under a root; a hub-id-shaped name is never read from the disk outside the
roots; and the answer is the same whether or not a path exists."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.db import reset_caches
from service.paths import model_reference, resolve_under
from svc_support import tiny_job
from w2s.models import resolve_model_source
from w2s.spec import ModelSpec


def fields(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {".".join(map(str, item["loc"][1:])): item["msg"] for item in response.json()["detail"]}


def test_resolve_under_follows_links_and_never_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "m").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    (root / "leak").symlink_to(outside / "secret")  # under the root by name, outside once resolved
    monkeypatch.chdir(outside)
    assert resolve_under("m", [root]) == (root / "m").resolve()
    assert resolve_under(str(root / "m"), [root]) == (root / "m").resolve()
    assert resolve_under("leak", [root]) is None
    # "secret" exists in the working directory, which is never a candidate: it means root/secret.
    assert resolve_under("secret", [root]) == (root / "secret").resolve()
    assert resolve_under("../outside/secret", [root]) is None
    assert resolve_under("missing", [root]) == (root / "missing").resolve()  # inside: the loader says
    assert resolve_under("./models/m", [root], base=tmp_path) == (root / "models" / "m").resolve()
    assert resolve_under("./root/m", [root], base=tmp_path) == (root / "m").resolve()


def test_a_hub_id_is_a_local_model_only_under_a_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "org" / "local").mkdir(parents=True)
    (tmp_path / "cwd" / "outside" / "tiny-gpt2-a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert model_reference("org/local", [root]).value == str((root / "org" / "local").resolve())
    assert model_reference("outside/tiny-gpt2-a", [root]).value == "outside/tiny-gpt2-a"  # a hub id
    assert model_reference("gpt2", [root]).value == "gpt2"
    assert model_reference("/etc", [root]) is None
    assert model_reference("a/b/c", [root]).value == str((root / "a" / "b" / "c").resolve())


def test_the_loader_never_takes_a_hub_id_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "outside" / "tiny-gpt2-a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="read as a hub id"):
        resolve_model_source(ModelSpec(model="outside/tiny-gpt2-a"))
    assert resolve_model_source(ModelSpec(model="./outside/tiny-gpt2-a")) == str(
        (tmp_path / "outside" / "tiny-gpt2-a").resolve()
    )


def test_a_directory_named_like_a_hub_id_in_the_apis_directory_is_not_a_model(
    client: TestClient, make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Before: "outside/tiny-gpt2-a", relative to the server's working directory and outside the
    roots, was accepted and trained."""
    team = make_team()
    cwd = tmp_path / "server"
    shutil.copytree(tiny_bert, cwd / "outside" / "tiny-gpt2-a")
    monkeypatch.chdir(cwd)
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"] = {"model": "outside/tiny-gpt2-a"}
    errors = fields(client.post("/v1/jobs", json=body, headers=team.headers))
    assert "is not in this service's Hugging Face cache" in errors["weak.model"]


def test_a_link_under_a_root_that_leads_outside_is_refused(
    client: TestClient, make_team, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(tiny_bert, outside / "model")
    (root / "linked").symlink_to(outside / "model")
    monkeypatch.setenv("W2S_MODEL_ROOTS", f'["{root}"]')
    reset_caches()
    team = make_team()
    body = tiny_job(tiny_bert, tiny_bert)
    body["weak"] = {"model": str(root / "linked")}
    body["strong"] = {"model": str(root / "linked")}
    errors = fields(client.post("/v1/jobs", json=body, headers=team.headers))
    assert "under the model roots" in errors["weak.model"]


def test_existing_and_missing_paths_are_answered_alike(
    client: TestClient, make_team, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Before: "main" got 201 and "proc/self" 422 (run from /), telling which directories exist."""
    team = make_team()
    monkeypatch.chdir("/")
    answers = {}
    for name in (
        "proc/self",
        "no-such/dir",
        "/proc/self",
        "/no/such/dir",
        "../../proc/self",
        "../../no/such",
    ):
        body = tiny_job(tiny_bert, tiny_bert)
        body["weak"] = {"model": name}
        response = client.post("/v1/jobs", json=body, headers=team.headers)
        answers[name] = (response.status_code, fields(response)["weak.model"].replace(name, "<name>"))
    assert len({answer for name, answer in answers.items() if not name.startswith(("/", ".", "../"))}) == 1
    assert len({answer for name, answer in answers.items() if name.startswith(("/", ".", "../"))}) == 1
