"""Losses of your own reach the library by the two plug-in routes (W2S_LOSS_MODULES, ``w2s.losses``
entry points): ``w2s losses`` lists them, ``w2s run`` trains with them, a plug-in that cannot be
loaded is named with the fix, and the stage key follows the plug-in's source."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from loss_plugins import (
    EXAMPLE_PACKAGE,
    UNDECORATED,
    as_new_process,
    fresh_registry,
    unique,
    write_distribution,
    write_loss_module,
)

from w2s import losses
from w2s.cli import main
from w2s.losses import LossPluginError, build_loss, check_minibatch_invariance, loss_names
from w2s.settings import LibrarySettings, library_settings
from w2s.spec import LossSpec, parse_spec
from w2s.splits import prepare_seed_data
from w2s.stages import loss_code_hash, plan_seed


@pytest.fixture(autouse=True)
def new_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("W2S_LOSS_MODULES", raising=False)
    fresh_registry(monkeypatch)


def loss_modules(monkeypatch: pytest.MonkeyPatch, folder: Path, *modules: str) -> None:
    """W2S_LOSS_MODULES naming ``modules``, importable from ``folder`` (PYTHONPATH, in a deployment)."""
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("W2S_LOSS_MODULES", ",".join(modules))
    library_settings.cache_clear()
    as_new_process(monkeypatch, *modules)  # imported afresh, as a process starting now would


def test_w2s_loss_modules_reads_commas_or_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_LOSS_MODULES", " my_pkg.losses, other ")
    assert LibrarySettings().loss_modules == ["my_pkg.losses", "other"]
    monkeypatch.setenv("W2S_LOSS_MODULES", '["my_pkg.losses"]')
    assert LibrarySettings().loss_modules == ["my_pkg.losses"]
    monkeypatch.setenv("W2S_LOSS_MODULES", "my-pkg/losses.py")
    with pytest.raises(ValueError, match=r"W2S_LOSS_MODULES: 'my-pkg/losses\.py' is not a module name"):
        LibrarySettings()


def test_a_module_in_w2s_loss_modules_registers_its_loss_and_w2s_losses_lists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module, name = unique("plugin_losses"), unique("scaled")
    write_loss_module(tmp_path / "src", module, name, scale="3.0")
    loss_modules(monkeypatch, tmp_path / "src", module)
    assert module not in sys.modules  # nothing imported it before the first lookup
    monkeypatch.setenv("COLUMNS", "250")  # the table's cells on one line each
    assert main(["losses"]) == 0
    listing = capsys.readouterr().out
    assert name in listing and "offset=0.0" in listing and module in listing
    assert "Cross entropy times a constant" in listing
    assert build_loss(name, {"offset": 1.5}).offset == 1.5  # type: ignore[attr-defined]


def test_an_installed_entry_point_registers_a_class_or_imports_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site-packages"  # as `pip install --target` would fill it
    undecorated, decorated = unique("halved_mod"), unique("scaled_mod")
    site.mkdir()
    (site / f"{undecorated}.py").write_text(UNDECORATED)
    class_name, module_name = unique("halved"), unique("scaled")
    write_loss_module(site, decorated, module_name)
    write_distribution(
        site,
        unique("my_losses"),
        {class_name: f"{undecorated}:Halved", "scaled_losses": decorated},
    )
    monkeypatch.syspath_prepend(str(site))
    names = loss_names()
    assert class_name in names and module_name in names  # the class by its entry point's name
    assert "scaled_losses" not in names  # a module's entry point is a label: its decorators name losses
    check_minibatch_invariance(build_loss(class_name))


def test_a_plug_in_that_does_not_load_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loss_modules(monkeypatch, tmp_path, "not_installed_losses")
    assert build_loss("xent")  # a built-in loss needs no plug-in loaded
    with pytest.raises(LossPluginError) as refused:
        build_loss("a_loss_of_mine")
    assert "W2S_LOSS_MODULES names 'not_installed_losses', which fails to import on this host" in str(
        refused.value
    )
    assert "every host that runs the API, `w2s run` or a worker" in str(refused.value)
    assert main(["losses"]) == 2  # one readable line, no traceback
    assert "not_installed_losses" in capsys.readouterr().err

    monkeypatch.delenv("W2S_LOSS_MODULES")
    fresh_registry(monkeypatch)
    package = unique("broken_pkg")
    write_distribution(tmp_path / "site", package, {"mine": "gone_module:Mine"})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(
        LossPluginError, match=rf"entry point mine = 'gone_module:Mine' of the package {package}"
    ):
        loss_names()


def test_a_plug_in_is_refused_under_accumulation_unless_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example loss weights classes by the batch's label mass, and declares it: exact in minibatches.
    loss_modules(monkeypatch, EXAMPLE_PACKAGE, "example_losses")
    check_minibatch_invariance(build_loss("balanced_xent", {"strength": 0.5}))
    undeclared = unique("undeclared_stats")
    (tmp_path / f"{undeclared}.py").write_text(
        (EXAMPLE_PACKAGE / "example_losses" / "__init__.py")
        .read_text()
        .replace('"balanced_xent"', '"balanced_undeclared"')
        .replace("def batch_statistics(", "def _batch_statistics(")  # computed per minibatch instead
        .replace("stats = self.batch_statistics(", "stats = self._batch_statistics(")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(undeclared)
    spec = {
        "dataset": {"name": "sst2"},
        "weak": {"model": "gpt2"},
        "strong": {"model": "gpt2", "batch_size": 8, "minibatch_size": 2},
        "losses": ["balanced_xent", "balanced_undeclared"],
    }
    with pytest.raises(ValueError, match=r"losses\[1\]: loss 'balanced_undeclared' changes when a batch"):
        parse_spec(spec)


def write_spec(path: Path, model: Path, plug_in: str) -> Path:
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    spec = {
        "dataset": {"name": "sst2", "n_train": 80, "n_test": 30},
        "weak": {"model": str(model), **options},
        "strong": {"model": str(model), "mode": "probe"},
        "losses": ["xent", plug_in],
    }
    path.write_text(json.dumps(spec))
    return path


def test_w2s_run_trains_with_a_plug_in_and_recomputes_only_its_student_once_it_is_edited(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name = unique("run_losses"), unique("scaled")
    source = write_loss_module(tmp_path / "src", module, name, scale="1.0")
    loss_modules(monkeypatch, tmp_path / "src", module)
    spec = write_spec(tmp_path / "spec.json", tiny_bert, name)
    store, out = tmp_path / "store", tmp_path / "out" / "results.json"
    argv = ["run", str(spec), "--data-dir", str(sst2_dir), "--store", str(store), "--out", str(out)]

    def cached_stages() -> dict[str, bool]:
        assert main(argv) == 0
        manifest = json.loads(out.with_name("results.manifest.json").read_text())
        return {stage["kind"]: stage["cached"] for stage in manifest["stages"]}

    first = cached_stages()
    assert set(json.loads(out.read_text())["students"]) == {"xent", name}
    assert not any(first.values())
    assert all(cached_stages().values())  # run again unchanged: everything from the store

    key = loss_code_hash(LossSpec(name=name))
    source.write_text(source.read_text().replace("* 1.0", "* 2.0"))
    # The file changed, the process still runs the code it imported: the key describes that code.
    assert loss_code_hash(LossSpec(name=name)) == key
    as_new_process(monkeypatch, module)  # the next `w2s run` imports the edited file
    after = cached_stages()
    assert after == {"weak": True, "ceiling": True, "student:xent": True, f"student:{name}": False}
    assert loss_code_hash(LossSpec(name=name)) != key


def test_the_stage_key_hashes_the_plug_ins_whole_module(
    tiny_bert: Path, sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name = unique("key_losses"), unique("scaled")
    source = write_loss_module(tmp_path / "src", module, name)
    loss_modules(monkeypatch, tmp_path / "src", module)
    spec = parse_spec(json.loads(write_spec(tmp_path / "spec.json", tiny_bert, name).read_text()))
    data = prepare_seed_data(spec, 0, sst2_dir)
    before = {plan.kind: plan.key for plan in plan_seed(spec, data, device_kind="cpu")}
    # A helper beside the class is part of what the loss computes: editing it recomputes too.
    source.write_text(source.read_text() + "\n\ndef helper():\n    return 2.0\n")
    as_new_process(monkeypatch, module)
    after = {plan.kind: plan.key for plan in plan_seed(spec, data, device_kind="cpu")}
    assert before[f"student:{name}"] != after[f"student:{name}"]
    assert {k: v for k, v in before.items() if name not in k} == {
        k: v for k, v in after.items() if name not in k
    }
    assert losses.loss_source("xent") is None  # the built-ins: the library's code hash covers them
