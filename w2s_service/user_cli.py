"""The user-facing ``w2s`` command: the library's commands (run, datasets, losses, models) plus the
commands that drive a w2s-service over its REST API.

    w2s submit SPEC [--name N] [--priority P] [--idempotency-key K] [--watch]   # prints the job id
    w2s list [--status S] [--dataset D] [--limit N]
    w2s watch ID                       # live progress per stage, then the results table
    w2s results ID [--json | --csv]
    w2s cancel ID | w2s retry ID
    w2s sweep submit GRID              # prints the sweep id
    w2s sweep plot ID --out plot.png   # test accuracy per strong model, one line per weak model

The service's URL and key come from ``--url``/``--key`` or ``W2S_URL`` (default
http://127.0.0.1:8000) and ``W2S_API_KEY``.

Exit codes: 0 done (the job succeeded), 1 the job failed, 2 bad input or usage (a 4xx from the
API included), 3 the job was cancelled, 4 the server cannot be reached or failed (5xx). Errors are
one line on stderr. The library's commands live in :mod:`w2s.cli`, which must not import HTTP code:
this module adds the client commands to its parser instead.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from service.display import ago, distinct_model_names, duration, percent, short_names
from service.states import ExportStatus, JobStatus, StageStatus, has_result
from w2s import cli as library_cli
from w2s import plots
from w2s.safe_text import terminal_safe
from w2s_service.client import DEFAULT_URL, ApiError, W2SClient

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4

JOB_STATUSES = tuple(str(status) for status in JobStatus)
TERMINAL = {
    JobStatus.succeeded: EXIT_OK,
    JobStatus.failed: EXIT_JOB_FAILED,
    JobStatus.cancelled: EXIT_CANCELLED,
}
FIGURES = ("accuracy", "auroc", "pgr", "agreement_with_weak")
# A server restart while watching should not end the watch: this many failed polls in a row do.
WATCH_RETRIES = 30


class CommandError(Exception):
    """A problem this command reports as one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


def stderr() -> Console:
    # Made per call, not at import: tests (capsys) and callers may swap sys.stderr.
    return Console(stderr=True)


def stdout() -> Console:
    return library_cli.results_console()


def print_error(message: str) -> None:
    """One line on stderr, whatever the message holds (newlines, rich markup, a long path, terminal
    escapes: messages echo what was sent)."""
    line = terminal_safe(" ".join(message.split()))
    stderr().print(Text("error: ", style="red") + Text(line), soft_wrap=True)


def echo(line: str) -> None:
    """One line on stdout with what came from the server (names, errors, links) escaped
    (w2s.safe_text): a job's name cannot recolour, move or rewrite the reader's terminal."""
    print(terminal_safe(line), flush=True)


def plain(value: object) -> Text:
    """A table cell from the server as it reads: escapes visible, no rich markup ("[link=...]")."""
    return Text(terminal_safe(value))


# -- inputs ---------------------------------------------------------------------------------------


def load_document(path: Path, what: str) -> dict[str, Any]:
    """A JSON or YAML file holding a mapping; the server validates the contents."""
    if not path.is_file():
        raise CommandError(f"{what}: file {str(path)!r} not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise CommandError(f"{what}: {path} is not valid JSON/YAML: {error}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{what}: {path} must hold a mapping (JSON object), not {type(data).__name__}")
    return data


def make_client(args: argparse.Namespace) -> W2SClient:
    url = args.url or os.environ.get("W2S_URL") or DEFAULT_URL
    key = args.key or os.environ.get("W2S_API_KEY") or None
    return W2SClient(url, key)


# -- formatting -----------------------------------------------------------------------------------


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


# The jobs table's name column: at most this wide (a longer name ends in "…"), and at least this wide
# before the table drops columns to fit the terminal.
NAME_WIDTH = 40
NAME_MIN_WIDTH = 12
# What gives way, in this order, when a terminal is too narrow for every row on one line. The id (every
# other command takes it), the models, the status and the run time always stay, whole.
COLUMNS_DROPPED_FIRST = ("age", "name", "dataset", "progress")
RIGHT_ALIGNED = ("progress", "age", "run time")
STATUS_STYLES = {
    JobStatus.succeeded: "green",
    JobStatus.failed: "red",
    JobStatus.cancelled: "yellow",
    JobStatus.running: "cyan",
}


def jobs_table(jobs: list[dict[str, Any]], now: dt.datetime | None = None, width: int = 120) -> Table:
    """``w2s list``: a line per job at ``width`` columns. Figures are the API's job summary's, written
    as the dashboard writes them (service.display): run time is ``duration_s``, progress ``progress``."""
    now = now or dt.datetime.now(dt.UTC)
    models = distinct_model_names(
        model for job in jobs for model in (job.get("weak_model", ""), job.get("strong_model", ""))
    )
    # Names, datasets and models are the users' (and old rows may hold escapes): plain() cells.
    cells: dict[str, list[str | Text]] = {
        "id": [plain(job["id"]) for job in jobs],
        # Sweeps name jobs "<sweep>: <weak model> -> <strong model>": paths by their last part.
        "name": [plain(" ".join(short_names(job.get("name") or "").split())) for job in jobs],
        "dataset": [plain(job.get("dataset", "")) for job in jobs],
        "weak → strong": [
            plain(f"{models[job.get('weak_model', '')]} → {models[job.get('strong_model', '')]}")
            for job in jobs
        ],
        "status": [
            Text(terminal_safe(job["status"]), style=STATUS_STYLES.get(job["status"], "")) for job in jobs
        ],
        "progress": [percent(job.get("progress", 0.0)) for job in jobs],
        "age": [ago(parse_time(job.get("created_at")), now) for job in jobs],
        "run time": [duration(job.get("duration_s")) for job in jobs],
    }
    longest_name = max((cell_width(name) for name in cells["name"]), default=0)
    for dropped in (COLUMNS_DROPPED_FIRST[:count] for count in range(len(COLUMNS_DROPPED_FIRST) + 1)):
        shown = {column: values for column, values in cells.items() if column not in dropped}
        name_width = min(NAME_WIDTH, max(longest_name, NAME_MIN_WIDTH))
        table = _jobs_table(len(jobs), shown, name_width)
        excess = natural_width(table) - width
        if excess > 0 and "name" in shown and name_width - excess >= NAME_MIN_WIDTH:
            name_width -= excess  # a shorter name before a column less
            table = _jobs_table(len(jobs), shown, name_width)
            excess = natural_width(table) - width
        if excess <= 0:
            break
    return table  # if even the columns that always stay are too wide, rich squeezes them


def cell_width(cell: str | Text) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


def natural_width(table: Table) -> int:
    """The table's width with no cell wrapped or cut."""
    console = Console(width=100_000)
    return Measurement.get(console, console.options, table).maximum


def _jobs_table(n_jobs: int, cells: dict[str, list[str | Text]], name_width: int) -> Table:
    table = Table(
        title=f"jobs ({n_jobs})", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0)
    )
    for column in cells:
        # Cells wrap only where even the columns that always stay do not fit on a line; ids never.
        if column == "id":
            table.add_column(column, no_wrap=True, min_width=max(map(cell_width, cells["id"]), default=0))
        elif column == "name":
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=name_width)
        else:
            table.add_column(column, justify="right" if column in RIGHT_ALIGNED else "left")
    for row in zip(*cells.values(), strict=True):
        table.add_row(*row)
    return table


def print_results(results: dict[str, Any]) -> None:
    """The table ``w2s run`` prints (stdout), then flags and timings (stderr)."""
    from w2s.results import FLAG_DESCRIPTIONS

    stdout().print(library_cli.results_table(results))
    errors = stderr()
    for flag in results.get("flags", []):
        errors.print(f"[yellow]flag[/] {flag}: {FLAG_DESCRIPTIONS.get(flag, '')}")
    if results.get("data"):
        for line in library_cli.data_lines(results["data"]):
            errors.print(line)
    timings = results.get("timings") or {}
    if timings:
        errors.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def results_csv_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per model (weak, ceiling, student:<loss>); each figure with its std and interval."""
    header = ["model"]
    for figure in FIGURES:
        header += [figure, f"{figure}_std", f"{figure}_ci_low", f"{figure}_ci_high"]
    models = [("weak", results["weak"]), ("ceiling", results["ceiling"])]
    models += [(f"student:{loss}", figures) for loss, figures in results["students"].items()]
    rows = []
    for model, figures in models:
        row: list[Any] = [model]
        for figure in FIGURES:
            interval = figures.get(f"{figure}_ci") or [None, None]
            for value in (figures.get(figure), figures.get(f"{figure}_std"), *interval):
                row.append("" if value is None else value)
        rows.append(row)
    return header, rows


def no_results(job: dict[str, Any]) -> CommandError:
    """Why a job has no results, with the exit code its status means."""
    job_id, status = job["id"], job["status"]
    if status == JobStatus.failed:
        return CommandError(
            f"job {job_id} failed: {job.get('error') or 'no error recorded'}", EXIT_JOB_FAILED
        )
    if status == JobStatus.cancelled:
        return CommandError(f"job {job_id} was cancelled (w2s retry {job_id} runs it again)", EXIT_CANCELLED)
    if status == JobStatus.succeeded:
        return CommandError(f"job {job_id} succeeded but has no results document", EXIT_JOB_FAILED)
    return CommandError(f"job {job_id} is {status}: no results yet (follow it with: w2s watch {job_id})")


# -- watch ----------------------------------------------------------------------------------------


class StageBars:
    """A live progress bar per stage of a job, fed from polls of the API."""

    def __init__(self, console: Console):
        self.bars = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            TextColumn("{task.fields[steps]:>11}"),
            TextColumn("{task.fields[status]}", markup=False),  # it quotes stage errors
            TextColumn("{task.fields[elapsed]}"),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StageBars:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)  # type: ignore[arg-type]

    @staticmethod
    def describe(stage: dict[str, Any], latest: dict[str, float]) -> str:
        status, metrics = stage["status"], stage.get("metrics") or {}
        accuracy = metrics.get("accuracy")
        if has_result(status):
            # The elapsed column beside it says how long it took.
            return (f"test acc {accuracy:.4f}  " if accuracy is not None else "") + (
                "cached" if status == StageStatus.cached else "done"
            )
        if status == StageStatus.failed:
            return terminal_safe(f"failed: {' '.join((stage.get('error') or '').split())[:80]}")
        if status == StageStatus.running and metrics.get("phase") == "features":
            rate = metrics.get("rows_per_s")
            return f"features of {metrics.get('split', 'the texts')}" + (
                f": {rate:.0f} rows/s" if rate else ""
            )
        if status == StageStatus.running:
            loss = latest.get("loss", metrics.get("loss"))
            parts = [f"loss {loss:.4f}"] if loss is not None else []
            if "train_accuracy" in latest:
                parts.append(f"train acc {latest['train_accuracy']:.3f}")
            if "eval_accuracy" in latest:
                parts.append(f"test acc {latest['eval_accuracy']:.3f}")
            return "  ".join(parts) or "running"
        return status

    def update(self, job: dict[str, Any], latest: dict[str, dict[str, float]]) -> None:
        for stage in job["stages"]:
            total, step = stage.get("total_steps"), stage.get("step") or 0
            if has_result(stage["status"]):
                total = total or max(step, 1)
                step = total
            fields = {
                "status": self.describe(stage, latest.get(stage["id"], {})),
                "steps": f"{step}/{total}" if total else "",
                "elapsed": self.elapsed(stage),
            }
            if stage["id"] not in self.tasks:
                name = f"{stage['kind']} (seed {stage['seed']})"
                self.tasks[stage["id"]] = self.bars.add_task(name, total=total, **fields)
            self.bars.update(self.tasks[stage["id"]], completed=step, total=total, **fields)

    @staticmethod
    def elapsed(stage: dict[str, Any]) -> str:
        # The stage's own running time from the server's timestamps, not how long we have watched.
        started, finished = parse_time(stage.get("started_at")), parse_time(stage.get("finished_at"))
        if started is None:
            return ""
        return duration(((finished or dt.datetime.now(dt.UTC)) - started).total_seconds())


class StageLines:
    """What ``w2s watch`` writes when its output is not a terminal (a file, a pipe, a CI log): a line
    per stage whenever what it shows changes, flushed at once, instead of bars that only a terminal
    can redraw (they printed nothing until the job ended). When nothing changes for ``QUIET_S``
    (a model loading, a slow machine), a line says what the job still waits on, so a slow job reads
    as slow, not stuck."""

    QUIET_S = 10.0

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic):
        self.console, self.clock = console, clock
        self.shown: dict[str, str] = {}
        self.last_line_at = clock()

    def __enter__(self) -> StageLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def text(stage: dict[str, Any], latest: dict[str, float]) -> str:
        total, step = stage.get("total_steps"), stage.get("step") or 0
        name = f"{stage['kind']} (seed {stage['seed']})"
        metrics = stage.get("metrics") or {}
        if stage["status"] == StageStatus.running and metrics.get("phase") == "features":
            rate = metrics.get("rows_per_s")
            return f"{name}: features of {metrics.get('split', 'the texts')}: {step} of {total} texts" + (
                f", {rate:.0f} texts/s" if rate else ""
            )
        if has_result(stage["status"]):  # as the bars show a finished stage: full
            total = total or max(step, 1)
            step = total
        steps = f" {step}/{total}" if total else ""
        return f"{name}:{steps} {StageBars.describe(stage, latest)}"

    @staticmethod
    def waiting(job: dict[str, Any]) -> str:
        running = []
        for stage in job["stages"]:
            if stage["status"] == StageStatus.running:
                took = StageBars.elapsed(stage)  # from the server's start time, once known
                running.append(f"{stage['kind']} (seed {stage['seed']})" + (f" for {took}" if took else ""))
        if running:
            return "still running: " + ", ".join(running)
        queued = sum(stage["status"] == StageStatus.queued for stage in job["stages"])
        if queued:
            return f"still waiting: {queued} stage(s) queued for a worker"
        return f"still waiting: job {job['status']}" + (
            ", being planned" if job["status"] == JobStatus.queued else ""
        )

    def say(self, text: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        self.console.print(f"{stamp} {terminal_safe(text)}", markup=False, highlight=False, soft_wrap=True)
        self.last_line_at = self.clock()

    def update(self, job: dict[str, Any], latest: dict[str, dict[str, float]]) -> None:
        said = False
        for stage in job["stages"]:
            text = self.text(stage, latest.get(stage["id"], {}))
            if self.shown.get(stage["id"]) != text:
                self.shown[stage["id"]] = text
                self.say(text)
                said = True
        if not said and job["status"] not in TERMINAL and self.clock() - self.last_line_at >= self.QUIET_S:
            self.say(self.waiting(job))
        self.console.file.flush()


def latest_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The last value of each series, per stage id."""
    latest: dict[str, dict[str, float]] = {}
    for series in metrics.get("series", []):
        if series.get("values"):
            latest.setdefault(series["stage_id"], {})[series["name"]] = series["values"][-1]
    return latest


def follow(
    client: W2SClient, job_id: str, *, interval: float, sleep: Callable[[float], None]
) -> dict[str, Any]:
    """Poll the job until it ends, drawing its stages; return the final job."""
    latest: dict[str, dict[str, float]] = {}
    fetched_at: tuple[tuple[str, int], ...] | None = None
    failures, seen = 0, False
    console = stderr()
    with StageBars(console) if console.is_terminal else StageLines(console) as bars:
        while True:
            try:
                job = client.get_job(job_id)
                running = tuple(
                    (s["id"], s["step"]) for s in job["stages"] if s["status"] == StageStatus.running
                )
                # Curves only change while a stage trains: fetch them only when a step moved.
                if running and running != fetched_at:
                    latest = latest_metrics(client.job_metrics(job_id))
                    fetched_at = running
                failures, seen = 0, True
            except ApiError as error:
                # Before the first answer an unreachable server is an error right away; later,
                # a restart or a database blip is waited out.
                if not (seen and error.unreachable) or failures >= WATCH_RETRIES:
                    raise
                failures += 1
                sleep(interval)
                continue
            bars.update(job, latest)
            if job["status"] in TERMINAL:
                return job
            sleep(interval)


def watch_job(client: W2SClient, job_id: str, interval: float) -> int:
    job = follow(client, job_id, interval=interval, sleep=time.sleep)
    if job["status"] == JobStatus.succeeded and job.get("results"):
        print_results(job["results"])
        return EXIT_OK
    raise no_results(job)


# -- commands -------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_document(args.spec, "spec")
    with make_client(args) as client:
        job = client.submit_job(
            spec, name=args.name, priority=args.priority, idempotency_key=args.idempotency_key
        )
        # Only the id on stdout, so JOB=$(w2s submit spec.json) works.
        echo(job["id"])
        if args.watch:
            return watch_job(client, job["id"], args.interval)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        page = client.list_jobs(status=args.status, dataset=args.dataset, limit=args.limit)
    console = stdout()
    console.print(jobs_table(page["data"], width=console.width))
    if page.get("next_cursor"):
        stderr().print(f"more jobs exist: raise --limit (now {args.limit}) or filter by --status/--dataset")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        return watch_job(client, args.id, args.interval)


def cmd_results(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = client.get_job(args.id)
    results = job.get("results")
    if not results:
        raise no_results(job)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.csv:
        header, rows = results_csv_rows(results)
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    else:
        print_results(results)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = client.cancel_job(args.id)
    echo(f"job {job['id']} {job['status']}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = client.retry_job(args.id)
    echo(f"job {job['id']} {job['status']} again")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Export a succeeded job to MLflow or W&B and, unless --no-wait, wait for the outcome."""
    with make_client(args) as client:
        export = client.export_job(args.id, args.to)
        deadline = time.monotonic() + args.timeout
        while args.wait and export["status"] == ExportStatus.pending and time.monotonic() < deadline:
            if export["attempts"] and export.get("error"):
                break  # a try failed: the service retries later by itself; say so now
            time.sleep(1.0)
            export = next(e for e in client.job_exports(args.id) if e["target"] == args.to)
    if export["status"] == ExportStatus.succeeded:
        echo(f"job {args.id} exported to {args.to}: {export['run_url'] or export['run_id']}")
        return EXIT_OK
    if export["status"] == ExportStatus.failed:
        raise CommandError(f"export of job {args.id} to {args.to} failed: {export['error']}", EXIT_JOB_FAILED)
    if export.get("error"):
        echo(
            f"export of job {args.id} to {args.to}: try {export['attempts']} failed ({export['error']}); "
            f"the service tries again at {export['due_at']} (follow it: w2s export-status {args.id})"
        )
    else:
        echo(
            f"export of job {args.id} to {args.to} is {export['status']} "
            f"(follow it: w2s export-status {args.id})"
        )
    return EXIT_OK


def cmd_export_status(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        exports = client.job_exports(args.id)
    if not exports:
        echo(f"job {args.id} has no exports (w2s export {args.id} --to mlflow|wandb)")
    for export in exports:
        where = export["run_url"] or export["run_id"] or "-"
        echo(f"{export['target']:<7} {export['status']:<10} tries {export['attempts']}  {where}")
        if export["status"] != ExportStatus.succeeded and export.get("error"):
            echo(f"        last error: {export['error']}")
    return EXIT_OK


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    grid = load_document(args.grid, "grid")
    if args.name is not None:
        grid["name"] = args.name
    if args.priority is not None:
        grid["priority"] = args.priority
    with make_client(args) as client:
        sweep = client.submit_sweep(grid)
    echo(sweep["id"])
    return EXIT_OK


def sweep_plot_data(sweep: dict[str, Any]) -> plots.SweepFigureData:
    """The figure's data for a sweep as GET /v1/sweeps/{id} returns it: w2s.plots' one definition,
    the one the dashboard draws too."""
    return plots.sweep_figure_data(sweep["grid"], sweep["table"], name=sweep.get("name") or "")


def plot_sweep(sweep: dict[str, Any], fmt: str = "png", dpi: int = 150) -> bytes:
    """The paper's plot of a sweep (see w2s.plots) as a file's bytes: png, svg, pdf, ..."""
    return plots.render_sweep(sweep_plot_data(sweep), fmt, dpi)


def cmd_sweep_plot(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    fmt = out.suffix.removeprefix(".").lower() if out is not None and out.suffix else "png"
    if fmt not in plots.supported_formats():  # before asking the server: a typo costs nothing
        raise CommandError(f"--out {out}: cannot write .{fmt}; use .png, .svg or .pdf")
    with make_client(args) as client:
        sweep = client.get_sweep(args.id)
    rows = sweep["table"]
    with_results = [r for r in rows if r["ceiling_accuracy"] is not None or r["weak_accuracy"] is not None]
    if not with_results:
        raise CommandError(
            f"sweep {args.id} is {sweep['status']}: none of its {len(rows)} jobs has results to plot yet"
        )
    if len(with_results) < len(rows):
        stderr().print(f"{len(rows) - len(with_results)} of {len(rows)} jobs have no results yet")
    out = out or Path(f"sweep-{sweep['id'][:8]}.png")
    image = plot_sweep(sweep, fmt, args.dpi)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(image)
    print(f"wrote {out}")
    return EXIT_OK


# -- parser and main ------------------------------------------------------------------------------

CLIENT_COMMANDS: set[Callable[[argparse.Namespace], int]] = {
    cmd_submit,
    cmd_list,
    cmd_watch,
    cmd_results,
    cmd_cancel,
    cmd_retry,
    cmd_sweep_submit,
    cmd_sweep_plot,
}


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    # argparse allows one add_subparsers() per parser: reach the library's instead of adding one.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("w2s.cli.build_parser() has no subcommands")


def build_parser() -> argparse.ArgumentParser:
    """The library's parser (run, datasets, losses, models) plus the service client commands."""
    parser = library_cli.build_parser()
    commands = _subcommands(parser)
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help=f"the service (env W2S_URL, default {DEFAULT_URL})")
    server.add_argument("--key", help="your team's API key (env W2S_API_KEY)")
    watching = argparse.ArgumentParser(add_help=False)
    watching.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    parents = [server]

    submit = commands.add_parser(
        "submit", parents=[server, watching], help="submit a job spec (JSON or YAML); prints the job id"
    )
    submit.add_argument("spec", type=Path)
    submit.add_argument("--name", help="a label for listings")
    submit.add_argument("--priority", type=int, help="-100..100, higher runs first (default 0)")
    submit.add_argument("--idempotency-key", help="a repeat with the same key returns the same job")
    submit.add_argument("--watch", action="store_true", help="then follow it like `w2s watch`")
    submit.set_defaults(handler=cmd_submit)

    listing = commands.add_parser("list", parents=parents, help="your team's jobs, newest first")
    listing.add_argument("--status", choices=JOB_STATUSES)
    listing.add_argument("--dataset")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (1-200, default 50)")
    listing.set_defaults(handler=cmd_list)

    watch = commands.add_parser(
        "watch", parents=[server, watching], help="live progress of a job, then its results"
    )
    watch.add_argument("id")
    watch.set_defaults(handler=cmd_watch)

    results = commands.add_parser("results", parents=parents, help="a finished job's results")
    results.add_argument("id")
    form = results.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="the results document")
    form.add_argument("--csv", action="store_true", help="one row per model")
    results.set_defaults(handler=cmd_results)

    cancel = commands.add_parser("cancel", parents=parents, help="cancel a queued or running job")
    cancel.add_argument("id")
    cancel.set_defaults(handler=cmd_cancel)
    retry = commands.add_parser("retry", parents=parents, help="rerun a failed or cancelled job")
    retry.add_argument("id")
    retry.set_defaults(handler=cmd_retry)

    export = commands.add_parser(
        "export", parents=parents, help="export a succeeded job to MLflow or Weights & Biases (now, or again)"
    )
    export.add_argument("id")
    export.add_argument("--to", choices=["mlflow", "wandb"], required=True)
    export.add_argument("--no-wait", dest="wait", action="store_false", help="return once it is queued")
    export.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the outcome")
    export.set_defaults(handler=cmd_export)
    export_status = commands.add_parser(
        "export-status", parents=parents, help="a job's exports and their links"
    )
    export_status.add_argument("id")
    export_status.set_defaults(handler=cmd_export_status)

    sweeps = commands.add_parser("sweep", help="weak x strong grids on one dataset").add_subparsers(
        dest="sweep", required=True
    )
    sweep_submit = sweeps.add_parser("submit", parents=parents, help="submit a grid; prints the sweep id")
    sweep_submit.add_argument("grid", type=Path, help="JSON/YAML: the body of POST /v1/sweeps")
    sweep_submit.add_argument("--name")
    sweep_submit.add_argument("--priority", type=int)
    sweep_submit.set_defaults(handler=cmd_sweep_submit)
    plot = sweeps.add_parser("plot", parents=parents, help="plot test accuracy per strong model")
    plot.add_argument("id")
    plot.add_argument(
        "--out", type=Path, help="the file to write, PNG, SVG or PDF by extension (default sweep-<id>.png)"
    )
    plot.add_argument("--dpi", type=int, default=150)
    plot.set_defaults(handler=cmd_sweep_plot)
    return parser


def run_client_command(args: argparse.Namespace) -> int:
    """Run a client command, turning every expected failure into one line and its exit code."""
    try:
        return args.handler(args)
    except CommandError as error:
        print_error(error.message)
        return error.code
    except ApiError as error:
        if error.status == 0:
            print_error(f"{error.message} (is the service running? w2s-service dev)")
            return EXIT_UNREACHABLE
        print_error(error.message)
        return EXIT_UNREACHABLE if error.unreachable else EXIT_USAGE
    except OSError as error:  # writing the plot, reading a spec that vanished
        print_error(str(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        stderr().print("interrupted (a submitted job keeps running on the service)")
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, argparse's message already shown)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.handler in CLIENT_COMMANDS:
        return run_client_command(args)
    # run, datasets, losses, models: exactly as the library's own entry point does them.
    return library_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
