"""Test helpers: tiny random-initialised models built from configs, a small learnable dataset, and
the locations of real offline data and models.

Nothing here downloads: tokenizers are trained on the fly with the ``tokenizers`` library.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POSITIVE = ["good", "great", "lovely", "superb", "fine", "happy"]
NEGATIVE = ["bad", "awful", "dull", "poor", "sad", "boring"]
FILLER = ["the", "movie", "was", "plot", "actors", "really", "quite", "and", "film", "story", "a", "!"]


def make_sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
    cue = rng.choice(POSITIVE if label else NEGATIVE)
    words.insert(rng.randrange(len(words) + 1), cue)
    return " ".join(words)


def write_sst2_like(data_dir: Path, n_train: int = 160, n_test: int = 60, seed: int = 0) -> Path:
    """A fake data dir in sst2's original fields, where the label is a cue word in the sentence."""
    rng = random.Random(seed)
    folder = data_dir / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for idx in range(n):
                label = rng.randint(0, 1)
                handle.write(
                    json.dumps({"sentence": make_sentence(rng, label), "label": label, "idx": idx}) + "\n"
                )
    return data_dir


def _corpus() -> list[str]:
    rng = random.Random(1)
    return [make_sentence(rng, rng.randint(0, 1)) for _ in range(300)]


def build_tiny_gpt2(path: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded_init():
        GPT2Model(config).save_pretrained(path)
    return path


def build_tiny_llama_bf16(path: Path) -> Path:
    """A tiny Llama whose config declares bfloat16 and whose weights are stored in it, as most hub
    decoders ship (Qwen2.5's config says bfloat16): loading must not take that as the training dtype."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaModel

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    with seeded_init():
        LlamaModel(config).to(torch.bfloat16).save_pretrained(path)
    return path


@contextlib.contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Random initialisation from a fixed seed, without touching the caller's RNG: a tiny model's
    weights were whatever the global RNG held when its fixture first ran, so they changed with the
    order of the tests, and with them any result a test reads from the model."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_bert(path: Path) -> Path:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(_corpus(), vocab_size=200, min_frequency=1)
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    with seeded_init():
        BertModel(config).save_pretrained(path)
    return path


def shared_data_dir() -> Path | None:
    """The real offline datasets, when this checkout sits beside ../shared/data."""
    candidates = [
        os.environ.get("W2S_TEST_DATA_DIR"),
        Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    for candidate in candidates:
        if candidate and Path(candidate, "sst2", "train.jsonl").is_file():
            return Path(candidate)
    return None


def offline_model_dir(name: str) -> Path | None:
    """A prepared offline model (``w2s models prepare-offline models``), if present."""
    root = Path(os.environ.get("W2S_TEST_MODELS_DIR", Path(__file__).resolve().parents[1] / "models"))
    path = root / name
    return path if (path / "model.safetensors").is_file() else None


@contextlib.contextmanager
def registered_losses(**classes: type) -> Iterator[None]:
    """Register plug-in losses for one test only, so other tests' loss lists stay the built-in ones."""
    from w2s.losses import _REGISTRY, register_loss

    for name, cls in classes.items():
        register_loss(name)(cls)
    try:
        yield
    finally:
        for name in classes:
            _REGISTRY.pop(name, None)


class OutageProxy:
    """A TCP proxy in front of a server (the test S3 server) that can be taken down and brought back:
    while down, connections are refused at once (the listening socket is closed), as when a store's
    endpoint goes away; open connections are cut."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._connections: list[Any] = []
        self._listener: Any = None
        self._lock = threading.Lock()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.close()

    def _accept(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: down
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    def new_bucket(self) -> str:
        """A fresh bucket on the server; returns its s3:// URI with a prefix, as a store would use it."""
        import boto3

        name = f"w2s-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}/store"
