"""Test helpers: tiny random-initialised models built from configs, a small learnable dataset, and
the locations of real offline data and models.

Nothing here downloads: tokenizers are trained on the fly with the ``tokenizers`` library.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

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
    LlamaModel(config).to(torch.bfloat16).save_pretrained(path)
    return path


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
