"""The README's figures of the example job come from its recorded run (issue 29, item 4):
examples/results/sst2_minilm_to_mpnet.json, written by `bash scripts/run-example.sh --record` and
rendered into README.md by scripts/readme_results.py. These tests read the record; none writes it."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_results = _renderer()


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_shows_the_recorded_run() -> None:
    record = readme_results.load_record()
    assert readme_results.readme_blocks(readme()) == readme_results.render_blocks(record), (
        "README.md's generated blocks differ from examples/results/sst2_minilm_to_mpnet.json: "
        "run python scripts/readme_results.py render"
    )


def test_the_record_is_of_the_example_as_it_is_now() -> None:
    """A record of another spec would describe a job the README's command no longer runs."""
    record = readme_results.load_record()
    example = json.loads((ROOT / record["example"]).read_text())
    assert record["job"]["status"] == "succeeded"
    assert record["spec"]["seeds"] == example["seeds"]
    assert record["spec"]["dataset"]["n_train"] == example["dataset"]["n_train"]
    assert [loss["name"] for loss in record["spec"]["losses"]] == [
        loss if isinstance(loss, str) else loss["name"] for loss in example["losses"]
    ]
    assert len(record["job"]["stages"]) == len(example["seeds"]) * (2 + len(example["losses"]))


def test_the_readmes_other_quotes_of_the_example_agree_with_the_record() -> None:
    """The regularisation note quotes the example's PGR without regularisation: the recorded ones."""
    students = readme_results.load_record()["results"]["students"]
    xent = next(figures for loss, figures in students.items() if loss == "xent")
    product = next(figures for loss, figures in students.items() if loss == "product")
    text = " ".join(readme().split())
    quoted = re.search(r"xent PGR goes from (\d\.\d\d) \(none\).*? product PGR from (\d\.\d\d)", text)
    assert quoted, "the README's regularisation note no longer quotes the example's PGR"
    assert quoted.groups() == (f"{xent['pgr']:.2f}", f"{product['pgr']:.2f}")


def test_render_rewrites_only_between_the_markers() -> None:
    blocks = {name: f"new {name}\n\nfigures" for name in readme_results.BLOCKS}
    text = "# Title\n\nbefore\n" + "".join(
        f"{readme_results.begin_marker(name)}\nold {name}\n{readme_results.end_marker(name)}\nafter {name}\n"
        for name in readme_results.BLOCKS
    )
    rendered = readme_results.with_blocks(text, blocks)
    assert readme_results.readme_blocks(rendered) == blocks
    assert rendered.startswith("# Title\n\nbefore\n") and "old" not in rendered
    assert all(f"after {name}\n" in rendered for name in readme_results.BLOCKS)
    assert readme_results.with_blocks(rendered, blocks) == rendered  # rendering twice changes nothing


def test_render_says_which_marker_is_missing() -> None:
    with pytest.raises(SystemExit, match="example-timing:begin"):
        readme_results.readme_blocks("# a README without the markers\n")


def test_render_check_fails_on_a_readme_that_drifted(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(readme().replace("| weak (", "| weak, hand-edited (", 1))
    assert readme_results.main(["render", "--readme", str(stale), "--check"]) == 1
    assert readme_results.main(["render", "--readme", str(stale)]) == 0  # writes only that README
    assert stale.read_text() == readme()
    assert readme_results.main(["render", "--readme", str(stale), "--check"]) == 0


def _job_from(record: dict[str, Any], status: str = "succeeded") -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} answers it, with the recorded figures."""
    return {
        "status": status,
        "error": None if status == "succeeded" else "boom",
        "created_at": "2026-12-08T01:00:00+00:00",
        "finished_at": "2026-12-08T01:05:30+00:00",
        "spec": record["spec"],
        "results": record["results"] if status == "succeeded" else None,
        "stages": [
            {
                "kind": stage["kind"],
                "seed": stage["seed"],
                "status": stage["status"],
                "stage_key": stage["stage_key"],
                "duration_s": stage["run_s"],
                "total_steps": stage["train_steps"],
                "gpu": None,
            }
            for stage in record["job"]["stages"]
        ],
    }


def test_record_writes_the_figures_a_run_measured(tmp_path: Path) -> None:
    recorded = readme_results.load_record()
    job, watch = tmp_path / "job.json", tmp_path / "watch.json"
    job.write_text(json.dumps(_job_from(recorded)))
    watch.write_text(json.dumps({"features_seen": {"weak 0": {"half A": 1997}}, "load_1min": [1.0, 3.0]}))
    out = tmp_path / "record.json"
    args = ["record", "--job", str(job), "--watch", str(watch), "--out", str(out), "--load-at-start", "0.5"]
    assert readme_results.main([*args, "--wall-s", "install=90", "job=330", "total=450"]) == 0
    record = json.loads(out.read_text())
    assert record["results"] == recorded["results"]
    assert record["job"]["wall_s"] == 330.0
    assert record["wall_s"] == {"install": 90.0, "job": 330.0, "total": 450.0}
    assert record["machine"]["load_1min"] | {"at_end": None} == {
        "at_start": 0.5,
        "during_job_mean": 2.0,
        "during_job_max": 3.0,
        "at_end": None,
    }
    assert record["job"]["stages"][0]["features_computed"] == {"half A": 1997}
    assert record["versions"]["torch"] and record["machine"]["cores"]
    readme_results.render_blocks(record)  # a fresh record renders


def test_record_refuses_a_job_that_did_not_succeed(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(_job_from(copy.deepcopy(readme_results.load_record()), status="failed")))
    with pytest.raises(SystemExit, match="job failed: nothing to record"):
        readme_results.main(["record", "--job", str(job), "--out", str(tmp_path / "record.json")])
    assert not (tmp_path / "record.json").exists()
