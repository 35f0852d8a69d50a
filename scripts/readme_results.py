"""The README's figures of the example job, from a recorded run rather than by hand.

    python scripts/readme_results.py record --job runs/job.json --watch runs/job-watch.json \\
        --out runs/example-record.json --wall-s install=95 models=14 stack=9 job=190 total=310
    python scripts/readme_results.py render          # README.md's generated blocks, from RECORD
    python scripts/readme_results.py render --check  # exit 1 if README.md differs from RECORD

`bash scripts/run-example.sh` runs ``record`` after every run (runs/example-record.json);
`bash scripts/run-example.sh --record` copies that record to RECORD and runs ``render``.
tests/test_readme_results.py renders RECORD and compares it with README.md, so the README's
figures cannot drift from the recorded run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = "examples/sst2_minilm_to_mpnet.json"
RECORD = ROOT / "examples" / "results" / "sst2_minilm_to_mpnet.json"


# ---------------------------------------------------------------------------------------------
# record: what a run of scripts/run-example.sh measured, as a small JSON document (figures, no data)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _machine() -> dict[str, Any]:
    cpuinfo, meminfo = _read("/proc/cpuinfo").splitlines(), _read("/proc/meminfo").splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    memory_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None,
        "system": f"{platform.system()} {platform.release()}",
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)


def _load_now() -> float | None:
    fields = _read("/proc/loadavg").split()
    return float(fields[0]) if fields else None


def make_record(
    job: dict[str, Any], watch: dict[str, Any], wall_s: dict[str, float], load_at_start: float | None
) -> dict[str, Any]:
    """The record of one run: ``job`` as GET /v1/jobs/{id} returned it at the end, ``watch`` what the
    script's progress lines saw (texts per feature extraction, load samples), the script's phase
    times and the load average when it started."""
    if job.get("status") != "succeeded" or not job.get("results"):
        raise SystemExit(f"readme_results: job {job.get('status')}: nothing to record ({job.get('error')})")
    features_seen = watch.get("features_seen", {})
    stages = [
        {
            "kind": stage["kind"],
            "seed": stage["seed"],
            "status": stage["status"],
            "stage_key": stage["stage_key"],
            "run_s": stage.get("duration_s")
            or _seconds_between(stage.get("started_at"), stage.get("finished_at")),
            "train_steps": stage.get("total_steps") if stage["status"] == "succeeded" else None,
            # The texts whose features the stage computed, per split, as the progress lines saw them
            # (a split done between two looks, 2 s apart, is missing).
            "features_computed": features_seen.get(f"{stage['kind']} {stage['seed']}", {}),
            "gpu": stage.get("gpu"),
        }
        for stage in job["stages"]
    ]
    loads = [load for load in watch.get("load_1min", []) if load is not None]
    commit = _git("rev-parse", "HEAD")
    return {
        "example": EXAMPLE,
        "command": "bash scripts/run-example.sh",
        "recorded_at": job.get("finished_at"),
        "machine": _machine()
        | {
            "gpus": sorted({stage["gpu"] for stage in stages if stage["gpu"]}),
            "load_1min": {
                "at_start": load_at_start,
                "during_job_mean": round(sum(loads) / len(loads), 2) if loads else None,
                "during_job_max": max(loads) if loads else None,
                "at_end": _load_now(),
            },
        },
        "versions": {
            "commit": commit,
            # Uncommitted changes to tracked files when it ran (a shared working tree, say).
            "commit_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "python": platform.python_version(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
        },
        "wall_s": wall_s,
        "job": {
            "status": job["status"],
            "wall_s": _seconds_between(job.get("created_at"), job.get("finished_at")),
            "stages": stages,
        },
        "spec": job["spec"],
        "results": job["results"],
    }


def _wall_times(pairs: list[str]) -> dict[str, float]:
    times = {}
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        if not name or not seconds:
            raise SystemExit(f"readme_results: --wall-s takes NAME=SECONDS pairs, not {pair!r}")
        times[name] = float(seconds)
    return times


def cmd_record(args: argparse.Namespace) -> int:
    job = json.loads(Path(args.job).read_text())
    watch = json.loads(Path(args.watch).read_text()) if args.watch and Path(args.watch).is_file() else {}
    load = float(args.load_at_start) if args.load_at_start else None
    record = make_record(job, watch, _wall_times(args.wall_s), load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# render: the README's blocks of figures, from a record


BLOCKS = ("example-timing", "results")  # README.md holds each between its begin and end markers


def begin_marker(name: str) -> str:
    return (
        f"<!-- {name}:begin (generated from {RECORD.relative_to(ROOT)} by "
        "`python scripts/readme_results.py render`: edit neither by hand) -->"
    )


def end_marker(name: str) -> str:
    return f"<!-- {name}:end -->"


def _prose(text: str) -> str:
    """A paragraph wrapped as the README's own text is."""
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _figure(summary: dict[str, Any], name: str, digits: int = 3) -> str:
    """``name`` of a results entry: mean ± spread over seeds [95% interval], as far as known."""
    value = summary.get(name)
    if value is None:
        return "undefined"
    text = f"{value:.{digits}f}"
    if summary.get(f"{name}_std") is not None:
        text += f" ± {summary[f'{name}_std']:.{digits}f}"
    if summary.get(f"{name}_ci"):
        low, high = summary[f"{name}_ci"]
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def _model_name(spec: dict[str, Any], role: str) -> str:
    return Path(str(spec[role]["model"])).name


def _load(record: dict[str, Any]) -> str:
    load, cores = record["machine"]["load_1min"], record["machine"]["cores"]
    if load.get("during_job_mean") is None:
        return "its load not measured"
    return (
        f"a 1-minute load average of {load['during_job_mean']:.1f} over the job (at most "
        f"{load['during_job_max']:.1f}; {cores} is enough to keep its {cores} cores busy)"
    )


def _machine_line(record: dict[str, Any]) -> str:
    machine = record["machine"]
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    return f"{machine['cores']} CPU cores ({machine['cpu']}), {machine['memory_gib']} GiB, {gpus}"


def _stage_groups(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the stages that compute features: weak and ceiling, the student stages)."""
    stages = record["job"]["stages"]
    return [s for s in stages if s["kind"] in ("weak", "ceiling")], [
        s for s in stages if s["kind"] not in ("weak", "ceiling")
    ]


def _texts(stages: list[dict[str, Any]]) -> int:
    return sum(sum(stage["features_computed"].values()) for stage in stages)


def render_example_timing(record: dict[str, Any]) -> str:
    """The set-up section's sentence: how long the recorded run took, where, and on what."""
    spec, wall = record["spec"], record["wall_s"]
    features, students = _stage_groups(record)
    weak = [s for s in features if s["kind"] == "weak"]
    ceiling = [s for s in features if s["kind"] == "ceiling"]
    student_s = [s["run_s"] or 0.0 for s in students]
    return _prose(
        f"The run recorded for this README (its figures are under [Results](#results)) took "
        f"{_duration(wall['total'])} for the whole command and {_duration(record['job']['wall_s'])} for "
        f"the job, on {_machine_line(record)}, with {_load(record)}. Of the job, "
        f"{_duration(sum(s['run_s'] or 0.0 for s in features))} went to the {len(features)} weak and "
        f"ceiling stages, which load their model and compute its features of the texts not seen before "
        f"({_model_name(spec, 'weak')} {_texts(weak):,} texts, {_model_name(spec, 'strong')} "
        f"{_texts(ceiling):,}, as the progress lines counted them), and "
        f"{_duration(sum(student_s))} to the {len(students)} student stages, which train a head on "
        f"stored features ({min(student_s):.1f} to {max(student_s):.1f} s each)."
    )


def _splits_line(results: dict[str, Any]) -> str:
    splits = results["data"]["splits"]
    names = {"train_a": "half A", "train_b": "half B", "test": "test"}
    parts = []
    for split, name in names.items():
        counts = splits[split]
        part = f"{name} {counts['rows']:,.0f}"
        if counts["overlap_removed"]:
            part += f" ({counts['overlap_removed']:,.0f} removed as overlap)"
        parts.append(part)
    dropped = sum(splits[split]["dropped_too_long"] for split in names)
    truncated = sum(splits[split]["truncated"] for split in names)
    return (
        "Rows used per seed (means over seeds): "
        + ", ".join(parts)
        + f"; {dropped:,.0f} dropped as too long, {truncated:,.0f} truncated."
    )


ELIDED = "<...>"  # stands for what the excerpt leaves out; written as ... in the README


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _json_excerpt(results: dict[str, Any]) -> str:
    """The results document with its first student and half B's counts, the rest elided."""
    more = {ELIDED: ELIDED}
    loss, student = next(iter(results["students"].items()))
    figures = ("accuracy", "auroc", "pgr", "pgr_ci", "pgr_undefined_share", "pgr_per_seed")
    agreements = ("agreement_with_weak", "weak_agreement", "weak_agreement_std")
    shown = [key for key in figures + agreements if key in student]  # as the record has them
    timings = results.get("timings") or {}
    data = results["data"]
    excerpt = {
        "weak": {key: results["weak"][key] for key in ("accuracy", "accuracy_std", "accuracy_ci", "auroc")}
        | more,
        "ceiling": more,
        "gap": results["gap"],
        "students": {loss: {key: student[key] for key in shown} | more} | more,
        "data": {
            "splits": {"train_a": more, "train_b": data["splits"]["train_b"], "test": more},
            "per_seed": [ELIDED],
            "resample_per_seed": data.get("resample_per_seed"),
        }
        | more,
        "flags": results["flags"],
        "seeds": results["seeds"],
        "per_seed": [ELIDED],
        "timings": {"weak": timings.get("weak")} | more | {"total": timings.get("total")},
    }
    lines = [f"{json.dumps(key)}: {json.dumps(_rounded(value))}" for key, value in excerpt.items()]
    text = "{" + ",\n ".join([*lines[:-4], ", ".join(lines[-4:])]) + "}"  # flags to timings: one line
    return (
        "```json\n" + text.replace(f'"{ELIDED}": "{ELIDED}"', "...").replace(f'"{ELIDED}"', "...") + "\n```"
    )


def render_results(record: dict[str, Any]) -> str:
    """The Results section's figures: the table, the rows, the machine and the stage times, then the
    results document itself, abridged."""
    spec, results = record["spec"], record["results"]
    weak, strong = _model_name(spec, "weak"), _model_name(spec, "strong")
    versions = record["versions"]
    rows = [
        "| model | accuracy | AUROC | PGR | agreement with weak |",
        "|---|---|---|---|---|",
        f"| weak ({weak}) | {_figure(results['weak'], 'accuracy')} | "
        f"{_figure(results['weak'], 'auroc')} | | |",
        f"| strong ceiling ({strong}) | {_figure(results['ceiling'], 'accuracy')} | "
        f"{_figure(results['ceiling'], 'auroc')} | | |",
    ]
    for loss, student in results["students"].items():
        rows.append(
            f"| student, {loss} | {_figure(student, 'accuracy')} | {_figure(student, 'auroc')} | "
            f"{_figure(student, 'pgr', 2)} | {_figure(student, 'agreement_with_weak')} |"
        )
    stage_rows = [
        "| stage | seed | ran | features computed (texts) | head training steps |",
        "|---|---|---|---|---|",
    ]
    for stage in record["job"]["stages"]:
        computed = ", ".join(f"{split} {count:,}" for split, count in stage["features_computed"].items())
        ran = "—" if stage["run_s"] is None else f"{stage['run_s']:.1f} s"
        if stage["status"] != "succeeded":
            ran += f" ({stage['status']})"
        steps = "—" if stage["train_steps"] is None else f"{stage['train_steps']:,}"
        stage_rows.append(f"| {stage['kind']} | {stage['seed']} | {ran} | {computed or 'none'} | {steps} |")
    dataset = spec["dataset"]
    gap = results["gap"]
    gap_ci = gap["ceiling_minus_weak_ci"]
    wall = record["wall_s"]
    phases = ", ".join(
        f"{name} {_duration(wall[key])}"
        for key, name in (
            ("install", "installing"),
            ("models", "the models"),
            ("stack", "starting the service"),
        )
        if key in wall
    )
    date = (record.get("recorded_at") or "")[:10]
    commit = (versions.get("commit") or "unknown")[:7] + (
        " with uncommitted changes" if versions.get("commit_dirty") else ""
    )
    return "\n".join(
        [
            _prose(
                f"The example job, `{record['example']}` ({weak} → {strong} probes on {dataset['name']}, "
                f"n_train {dataset.get('n_train') or 'all'}, losses {', '.join(results['students'])}, "
                f"seeds {', '.join(str(seed) for seed in spec['seeds'])}), as `{record['command']}` "
                f"recorded it on {date}; mean over seeds ± standard deviation [95% bootstrap interval]:"
            ),
            "",
            *rows,
            "",
            _prose(
                f"Ceiling − weak {gap['ceiling_minus_weak']:.3f}"
                + (f" [{gap_ci[0]:.3f}, {gap_ci[1]:.3f}]" if gap_ci else "")
                + f"; flags: {', '.join(results['flags']) or 'none'}. {_splits_line(results)}"
            ),
            "",
            _prose(
                f"Measured on {_machine_line(record)}, with {_load(record)}; commit {commit}, Python "
                f"{versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}. "
                f"The job took {_duration(record['job']['wall_s'])} from submission to its results, the "
                f"whole command {_duration(wall['total'])} ({phases}). Stage by stage, in the order they ran:"
            ),
            "",
            *stage_rows,
            "",
            "The results document (`w2s results JOB --json`; `results` in `GET /v1/jobs/{id}`), abridged:",
            "",
            _json_excerpt(results),
        ]
    )


RENDERERS = {"example-timing": render_example_timing, "results": render_results}


def render_blocks(record: dict[str, Any]) -> dict[str, str]:
    return {name: RENDERERS[name](record) for name in BLOCKS}


def _block_span(text: str, name: str) -> tuple[int, int]:
    """Where block ``name``'s content lies in ``text``: after its begin marker's line, up to its end
    marker."""
    begin = text.find(f"<!-- {name}:begin")
    end = text.find(end_marker(name))
    if begin < 0 or end < begin or text.count(f"<!-- {name}:begin") != 1:
        raise SystemExit(
            f"readme_results: README.md needs exactly one '<!-- {name}:begin ... -->' line and a later "
            f"'{end_marker(name)}' line around the generated {name} block"
        )
    return text.index("\n", begin) + 1, end


def readme_blocks(text: str) -> dict[str, str]:
    """The generated blocks as README.md holds them now."""
    blocks = {}
    for name in BLOCKS:
        start, end = _block_span(text, name)
        blocks[name] = text[start:end].rstrip("\n")
    return blocks


def with_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each block between its markers replaced (the markers rewritten as well)."""
    for name, content in blocks.items():
        start, end = _block_span(text, name)
        begin_line = text.rfind("\n", 0, start - 1) + 1
        text = text[:begin_line] + begin_marker(name) + "\n" + content + "\n" + text[end:]
    return text


def load_record(path: Path = RECORD) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"readme_results: no record at {path}: `bash scripts/run-example.sh --record` makes one"
        ) from None


def cmd_render(args: argparse.Namespace) -> int:
    readme = Path(args.readme)
    text = readme.read_text()
    rendered = with_blocks(text, render_blocks(load_record(Path(args.record))))
    if args.check:
        if rendered != text:
            print(f"{readme} differs from {args.record}: run python scripts/readme_results.py render")
            return 1
        return 0
    if rendered != text:
        readme.write_text(rendered)
        print(f"{readme}: blocks {', '.join(BLOCKS)} rendered from {args.record}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="write the record of a run of scripts/run-example.sh")
    record.add_argument("--job", required=True, help="GET /v1/jobs/{id}'s answer at the end (runs/job.json)")
    record.add_argument("--watch", help="what the script's progress lines saw (runs/job-watch.json)")
    record.add_argument("--out", required=True)
    record.add_argument("--load-at-start", default="", help="the 1-minute load average at the script's start")
    record.add_argument("--wall-s", nargs="*", default=[], metavar="PHASE=SECONDS")
    record.set_defaults(handler=cmd_record)
    render = commands.add_parser("render", help="rewrite README.md's generated blocks from a record")
    render.add_argument("--record", default=str(RECORD), help=f"({RECORD.relative_to(ROOT)})")
    render.add_argument("--readme", default=str(README), help="(README.md)")
    render.add_argument("--check", action="store_true", help="exit 1 if README.md differs; write nothing")
    render.set_defaults(handler=cmd_render)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
