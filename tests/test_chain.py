"""Bootstrapping (Burns et al. §4.3.1): weak -> chain ... -> strong, each model trained on the labels
of the one before it, reported hop by hop and end to end next to the direct weak -> strong student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from w2s import metrics
from w2s.pipeline import run_experiment
from w2s.spec import SpecError, parse_spec, resolved_models
from w2s.splits import prepare_seed_data
from w2s.stages import STAGES, plan_seed, stage_layout, stages_per_seed
from w2s.store import ArtifactStore

CPU = torch.device("cpu")
OPTIONS = {"mode": "probe", "epochs": 10, "lr": 1e-2, "batch_size": 16, "max_length": 32}


def chain_spec(weak: Path, chain: list[Any], strong: Path, **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "sst2", "n_train": 96, "n_test": 40, "seed": 0},
        "weak": {"model": str(weak), **OPTIONS},
        "chain": chain,
        "strong": {"model": str(strong), **OPTIONS},
        "losses": ["xent"],
        "seeds": [0],
        **extra,
    }


def test_layout_of_a_four_model_chain(tiny_bert: Path, tiny_gpt2: Path) -> None:
    middle = {"model": str(tiny_gpt2), **OPTIONS}
    spec = parse_spec(chain_spec(tiny_bert, [middle, middle], tiny_bert, losses=["xent", "product"]))
    layout = {slot.kind: slot for slot in stage_layout(spec)}
    assert list(layout) == [
        "weak",
        "ceiling",
        "student:xent",
        "student:product",
        "ceiling@2",
        "ceiling@3",
        "chain@2:xent",
        "chain@3:xent",
        "chain@4:xent",
        "chain@2:product",
        "chain@3:product",
        "chain@4:product",
    ]
    # Each model learns from the one before it, and every model but the last labels half B.
    assert [layout[f"chain@{p}:xent"].supervisor for p in (2, 3, 4)] == [
        "weak",
        "chain@2:xent",
        "chain@3:xent",
    ]
    assert [layout[f"chain@{p}:xent"].labels_half_b for p in (2, 3, 4)] == [True, True, False]
    assert layout["chain@4:xent"].role == "student" and layout["chain@2:xent"].role == "student@2"
    assert layout["student:xent"].supervisor == "weak"


def test_no_chain_means_the_ordinary_layout(tiny_bert: Path) -> None:
    spec = parse_spec(chain_spec(tiny_bert, [], tiny_bert))
    assert [slot.kind for slot in stage_layout(spec)] == ["weak", "ceiling", "student:xent"]


def test_chain_entries_accept_model_ids_and_name_their_fields(tiny_bert: Path) -> None:
    spec = parse_spec(chain_spec(tiny_bert, [str(tiny_bert)], tiny_bert))
    assert spec.chain[0].model == str(tiny_bert)
    assert [name for name, _ in spec.named_models()] == ["weak", "chain.0", "strong"]
    with pytest.raises(SpecError) as caught:
        parse_spec(chain_spec(tiny_bert, [{"model": str(tiny_bert), "lr": -1}], tiny_bert))
    assert [loc for loc, _ in caught.value.errors] == ["chain.0.lr"]
    with pytest.raises(SpecError) as caught:
        parse_spec(chain_spec(tiny_bert, [str(tiny_bert)] * 7, tiny_bert))
    assert [loc for loc, _ in caught.value.errors] == ["chain"]


def test_intermediate_students_take_the_transfer_overrides(tiny_bert: Path, tiny_gpt2: Path) -> None:
    raw = chain_spec(tiny_bert, [{"model": str(tiny_gpt2), **OPTIONS, "lr": 0.5}], tiny_bert)
    models = resolved_models(parse_spec({**raw, "transfer": {"epochs": 3}}))
    assert models["ceiling@2"][1].lr == 0.5 and models["ceiling@2"][1].epochs == 10
    assert models["student@2"][1].lr == 0.5 and models["student@2"][1].epochs == 3


def test_a_chain_trains_each_model_on_its_predecessors_labels(
    tiny_bert: Path, tiny_gpt2: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    middle = {"model": str(tiny_gpt2), **OPTIONS}
    spec = parse_spec(chain_spec(tiny_bert, [middle], tiny_bert))
    plans = {
        plan.kind: plan for plan in plan_seed(spec, prepare_seed_data(spec, 0, sst2_dir), device_kind="cpu")
    }
    assert plans["chain@2:xent"].weak_key == plans["weak"].key
    assert plans["chain@3:xent"].weak_key == plans["chain@2:xent"].key
    assert plans["chain@2:xent"].predict is not None and plans["chain@3:xent"].predict is None
    assert plans["chain@2:xent"].model.model == str(tiny_gpt2)

    experiment = run_experiment(spec, store=store, data_dir=sst2_dir, device=CPU)
    by_kind = {stage.kind: stage for stage in experiment.stages}
    # The middle model labelled half B; the last hop trained on exactly those labels.
    middle_record = store.get_record(STAGES, by_kind["chain@2:xent"].key)
    assert middle_record is not None and middle_record["soft_labels"]

    chain = experiment.results["chain"]
    assert chain["models"] == [str(tiny_bert), str(tiny_gpt2), str(tiny_bert)]
    hops = chain["losses"]["xent"]["hops"]
    assert [(h["supervisor"], h["student"]) for h in hops] == [
        (str(tiny_bert), str(tiny_gpt2)),
        (str(tiny_gpt2), str(tiny_bert)),
    ]
    labels = np.asarray(prepare_seed_data(spec, 0, sst2_dir).test.labels)

    def accuracy(kind: str) -> float:
        return metrics.accuracy(store.get_array(by_kind[kind].test_probs), labels)

    # Each hop's PGR is measured against that hop's own ceiling.
    for hop, (supervisor, student, ceiling) in zip(
        hops,
        [("weak", "chain@2:xent", "ceiling@2"), ("chain@2:xent", "chain@3:xent", "ceiling")],
        strict=True,
    ):
        assert hop["supervisor_figures"]["accuracy"] == pytest.approx(accuracy(supervisor))
        assert hop["student_figures"]["accuracy"] == pytest.approx(accuracy(student))
        assert hop["ceiling_figures"]["accuracy"] == pytest.approx(accuracy(ceiling))
        gap = accuracy(ceiling) - accuracy(supervisor)
        expected = (accuracy(student) - accuracy(supervisor)) / gap if gap > 0 else None
        assert hop["student_figures"]["pgr"] == (pytest.approx(expected) if expected is not None else None)
    ends = chain["losses"]["xent"]["end_to_end"]
    assert ends["chain"]["accuracy"] == pytest.approx(accuracy("chain@3:xent"))
    assert ends["direct"]["accuracy"] == pytest.approx(experiment.results["students"]["xent"]["accuracy"])


def test_chain_stages_share_results_with_ordinary_jobs(
    tiny_bert: Path, tiny_gpt2: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    # weak A -> strong B, then the chain A -> B -> A: the chain's weak stage and B's ceiling are the
    # same computations as the ordinary job's and come from the store.
    store = ArtifactStore(str(tmp_path / "store"))
    middle = {"model": str(tiny_gpt2), **OPTIONS}
    ordinary = parse_spec({**chain_spec(tiny_bert, [], tiny_bert), "strong": middle})
    first = {s.kind: s for s in run_experiment(ordinary, store=store, data_dir=sst2_dir, device=CPU).stages}
    chain = parse_spec(chain_spec(tiny_bert, [middle], tiny_bert))
    second = {s.kind: s for s in run_experiment(chain, store=store, data_dir=sst2_dir, device=CPU).stages}
    assert second["weak"].cached and second["weak"].key == first["weak"].key
    assert second["ceiling@2"].cached and second["ceiling@2"].key == first["ceiling"].key
    # The middle student also labels half B for the next hop, so it is a different computation.
    assert second["chain@2:xent"].key != first["student:xent"].key


@pytest.mark.parametrize("losses", [["xent"], ["xent", "product"], ["xent", "logconf", "product", "entropy"]])
@pytest.mark.parametrize("chain_length", [0, 1, 3])
def test_stage_count_by_arithmetic_matches_the_layout(
    tiny_bert: Path, losses: list[str], chain_length: int
) -> None:
    """The service refuses oversized requests by this count before resolving anything: it must be
    the layout's own."""
    spec = parse_spec(chain_spec(tiny_bert, [str(tiny_bert)] * chain_length, tiny_bert, losses=losses))
    assert stages_per_seed(len(losses), chain_length) == len(stage_layout(spec))
