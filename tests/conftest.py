"""Shared fixtures: tiny models and a fake sst2 data dir (builders in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import build_tiny_bert, build_tiny_gpt2, build_tiny_llama_bf16, write_sst2_like


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama_bf16(tmp_path_factory.mktemp("models") / "tiny-llama-bf16")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def sst2_dir(tmp_path: Path) -> Path:
    return write_sst2_like(tmp_path / "data")
