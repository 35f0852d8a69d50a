"""Real decoder LMs (``w2s models prepare-offline models --decoders``): padding never changes pooling.

Each decoder is loaded through the library and pooled at its last real token: left- and right-padded
batches of texts of different lengths must give the features each text gives alone, whatever id
fills the padding. Tests never download: a decoder whose folder is not under models/ is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import offline_model_dir
from w2s.models import LoadedModel, load_classifier
from w2s.spec import ModelSpec, resolve_training
from w2s.train import TokenData, tokenize

pytestmark = pytest.mark.slow  # real weights: 135M-494M parameters, a few seconds to load each

DECODERS = ["SmolLM2-135M-Instruct", "gemma-3-270m", "Qwen2.5-Coder-0.5B-Instruct"]
TEXTS = [
    "Dull.",
    "A short one, with a comma.",
    "This film was an absolute delight from start to finish, with a clever plot and warm actors.",
    "The actors tried hard, but the story never came together; 3 stars out of 10, sadly.",
]


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request: pytest.FixtureRequest) -> LoadedModel:
    path: Path | None = offline_model_dir(request.param)
    if path is None:
        pytest.skip(
            f"{request.param} is not under models/: run `w2s models prepare-offline models --decoders` "
            "(or set W2S_TEST_MODELS_DIR)"
        )
    spec = ModelSpec(model=str(path))
    loaded = load_classifier(spec, resolve_training(spec))
    loaded.model.eval()
    return loaded


def _features(loaded: LoadedModel, ids: list[list[int]], pad_id: int, side: str) -> torch.Tensor:
    batch = TokenData(ids, pad_id=pad_id, padding_side=side).collate(range(len(ids)), torch.device("cpu"))
    with torch.no_grad():
        return loaded.model.features(**batch)


def test_loads_as_float32_decoder_with_a_pad_token(decoder: LoadedModel) -> None:
    # The folders store bfloat16 but declare float32, so training gets float32 master weights.
    assert {param.dtype for param in decoder.model.parameters()} == {torch.float32}
    assert decoder.pooling == "last" and decoder.model.causal
    assert decoder.tokenizer.pad_token_id is not None


def test_left_and_right_padding_pool_as_each_text_alone(decoder: LoadedModel) -> None:
    tokenizer = decoder.tokenizer
    ids = tokenize(tokenizer, TEXTS, max_length=64)
    assert len({len(row) for row in ids}) == len(ids), "the texts must differ in length to need padding"
    alone = torch.cat([_features(decoder, [row], tokenizer.pad_token_id, "right") for row in ids])
    # Float32 rounding differs between batch shapes; scale the tolerance to the features (decoders'
    # hidden states reach ~100), far below what pooling a wrong token or position would change.
    atol = 1e-3 * float(alone.abs().max())
    # Any id may fill the padding (pad, eos, id 0): the mask, not the id, says what is padding.
    for pad_id in dict.fromkeys([tokenizer.pad_token_id, tokenizer.eos_token_id, 0]):
        for side in ("right", "left"):
            batched = _features(decoder, ids, pad_id, side)
            message = f"{side} padding with id {pad_id}"
            torch.testing.assert_close(batched, alone, atol=atol, rtol=1e-3, msg=message)
    distances = torch.cdist(alone, alone) + torch.eye(len(ids)) * 1e9
    assert float(distances.min()) > 10 * atol  # each row pools its own last token
