"""Pooling and model loading: last-token pooling through the mask, never through token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from w2s.models import is_decoder_lm, last_token_pool, load_classifier, mean_pool, model_fingerprint
from w2s.spec import ModelSpec, resolve_training
from w2s.train import TokenData


def test_last_token_pool_right_and_left_padding() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (batch, seq, dim)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right)[:, 0].tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left)[:, 0].tolist() == [3.0, 7.0]


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_decoder_detection() -> None:
    from transformers import BertConfig, GPT2Config

    assert is_decoder_lm(GPT2Config())
    assert not is_decoder_lm(BertConfig())


def _features(model: torch.nn.Module, ids: list[list[int]], pad_id: int, side: str) -> torch.Tensor:
    batch = TokenData(ids, pad_id=pad_id, padding_side=side).collate(range(len(ids)), torch.device("cpu"))
    with torch.no_grad():
        return model.features(**batch)


def test_gpt2_pooling_with_token_id_zero_inside_text(tiny_gpt2: Path) -> None:
    """GPT-2's id 0 is "!": a text containing it, padded with id 0, must pool its own last token,
    identically with left and right padding and alone in a batch."""
    spec = ModelSpec(model=str(tiny_gpt2))
    loaded = load_classifier(spec, resolve_training(spec))
    assert loaded.pooling == "last"
    model = loaded.model.eval()
    with_zero = [5, 0, 7, 0, 9]  # ends in a real token after a real id 0
    ending_in_zero = [5, 6, 0]  # its last real token IS id 0
    short = [8]
    ids = [with_zero, ending_in_zero, short]
    alone = torch.cat([_features(model, [row], 0, "right") for row in ids])
    right = _features(model, ids, pad_id=0, side="right")
    left = _features(model, ids, pad_id=0, side="left")
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(right[1], right[2])  # each row pools its own last token


def test_bert_mean_pooling_matches_unpadded(tiny_bert: Path) -> None:
    spec = ModelSpec(model=str(tiny_bert))
    loaded = load_classifier(spec, resolve_training(spec))
    assert loaded.pooling == "mean"
    model = loaded.model.eval()
    ids = [[2, 5, 6, 7, 3], [2, 8, 3]]
    batched = _features(model, ids, pad_id=0, side="right")
    alone = torch.cat([_features(model, [row], 0, "right") for row in ids])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_head_starts_at_zero(tiny_bert: Path) -> None:
    spec = ModelSpec(model=str(tiny_bert))
    head = load_classifier(spec, resolve_training(spec)).model.head
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ModelSpec(model=str(tmp_path / "nope"))


def test_fingerprint_changes_with_weights(tmp_path: Path, tiny_bert: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_bert, tmp_path / "copy"))
    before = model_fingerprint(ModelSpec(model=str(copy)))
    assert before == model_fingerprint(ModelSpec(model=str(tiny_bert)))
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    assert model_fingerprint(ModelSpec(model=str(copy))) != before
    assert model_fingerprint(ModelSpec(model="gpt2")) == {"hub": "gpt2", "revision": "main"}
