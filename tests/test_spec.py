"""Spec validation: every bad field is named, with the choices or the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from w2s.spec import SpecError, load_spec, parse_spec, resolve_training


def base_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"name": "sst2", "n_train": 100, "n_test": 50},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2-medium"},
    }
    spec.update(overrides)
    return spec


def error_fields(spec: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    return dict(caught.value.errors)


def test_issue_example_parses() -> None:
    spec = parse_spec(
        {
            "dataset": {"name": "sst2", "n_train": 4000, "n_test": 1821, "seed": 0},
            "weak": {"model": "gpt2", "mode": "full", "lr": 5e-5, "epochs": 2},
            "strong": {"model": "gpt2-medium", "mode": "full", "lr": 5e-5, "epochs": 2},
            "transfer": {"lr": 5e-5, "epochs": 2},
            "losses": ["xent", {"name": "logconf", "aux_coef": 0.5, "warmup_frac": 0.1}, "product"],
            "seeds": [0],
        }
    )
    assert [loss.name for loss in spec.losses] == ["xent", "logconf", "product"]
    assert spec.losses[1].params == {"aux_coef": 0.5, "warmup_frac": 0.1}


def test_unknown_dataset_lists_choices() -> None:
    errors = error_fields(base_spec(dataset={"name": "mnist"}))
    assert "sciq" in errors["dataset.name"] and "sst2" in errors["dataset.name"]


def test_unknown_mode_names_field_and_choices() -> None:
    errors = error_fields(base_spec(weak={"model": "gpt2", "mode": "freeze"}))
    assert "'full', 'probe' or 'lora'" in errors["weak.mode"]


def test_unknown_loss_and_parameter() -> None:
    assert "xent" in error_fields(base_spec(losses=["nope"]))["losses.0"]
    assert "aux_coef" in error_fields(base_spec(losses=[{"name": "logconf", "aux": 1}]))["losses.0"]


def test_typo_in_field_lists_allowed_fields() -> None:
    errors = error_fields(base_spec(strong={"model": "gpt2", "learning_rate": 1e-5}))
    assert "allowed fields" in errors["strong.learning_rate"] and "lr" in errors["strong.learning_rate"]


def test_absurd_hyperparameters_are_refused() -> None:
    errors = error_fields(base_spec(weak={"model": "gpt2", "lr": -1, "batch_size": 0}))
    assert set(errors) == {"weak.lr", "weak.batch_size"}


def test_minibatch_must_divide_batch() -> None:
    errors = error_fields(base_spec(weak={"model": "gpt2", "batch_size": 32, "minibatch_size": 5}))
    assert "must divide" in errors["weak"]


def test_missing_local_model_directory(tmp_path: Path) -> None:
    errors = error_fields(base_spec(weak={"model": str(tmp_path / "missing")}))
    assert "does not exist" in errors["weak.model"]


def test_duplicate_seeds_and_losses() -> None:
    assert "distinct" in error_fields(base_spec(seeds=[0, 0]))["seeds"]
    assert "twice" in error_fields(base_spec(losses=["xent", "xent"]))["losses"]


def test_defaults_depend_on_mode_and_transfer_inherits_explicit_choices() -> None:
    spec = parse_spec(
        base_spec(strong={"model": "gpt2", "mode": "probe", "batch_size": 16}, transfer={"epochs": 5})
    )
    ceiling = resolve_training(spec.strong)
    student = resolve_training(spec.student_options())
    assert ceiling.lr == 1e-3 and ceiling.epochs == 30 and ceiling.batch_size == 16
    assert student.lr == 1e-3 and student.epochs == 5 and student.batch_size == 16
    assert resolve_training(spec.weak).lr == 5e-5  # full mode default


def test_yaml_spec_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("dataset: {name: sciq}\nweak: {model: gpt2}\nstrong: {model: gpt2-large}\n")
    assert load_spec(path).dataset.name == "sciq"
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.json")


def test_custom_dataset_file() -> None:
    spec = parse_spec(base_spec(dataset={"name": {"path": "x.csv", "text": "review", "label": "y"}}))
    assert spec.dataset.name.text == "review"  # type: ignore[union-attr]
