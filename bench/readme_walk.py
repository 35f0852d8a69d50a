"""The README's main command from a fresh clone, with every output line timestamped: the longest
silences (what was on screen while nothing new came) and the total time.

    W2S_DATA_DIR=../shared/data python bench/readme_walk.py [--source .] [--dest /tmp/walk]
        [--overlay PATH ...] [--max-gap 15] [--ignore REGEX ...] [--log PATH] [--json PATH]

It clones ``--source`` (committed files only, as a user's clone) into ``--dest`` (replaced), so the
install step runs into a new ``.venv`` (pip's download cache is whatever this machine has), then
runs ``bash scripts/run-example.sh`` there with stdout and stderr on one pipe, as a CI log or
``| tee`` sees them. Exit 1 if the longest silence is ``--max-gap`` seconds or more.

A silence is the time between two lines that say something; lines matching ``--ignore`` do not
count (by default pip's "WARNING: Location 'file:///...' is ignored", which this development
machine's pip configuration prints for every package: a user's pip prints none). ``--overlay``
copies files of ``--source``'s working tree over the clone: to measure a change before committing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Gap:
    seconds: float
    at: float  # seconds from the start at which the silence began
    before: str  # the last line printed before it
    after: str  # the line that ended it


DEFAULT_IGNORE = r"^WARNING: Location 'file:.*' is ignored"


def timed_lines(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[list[tuple[float, str]], int]:
    """Run ``command``; each line of its output (stdout and stderr together) with the seconds since
    the start at which it arrived, echoed as it comes; and the exit status. The command and every
    process it started are stopped when it ends early (a timeout, Ctrl-C)."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    child = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert child.stdout is not None
    watchdog = subprocess.Popen(  # the readline below blocks: a timer outside it stops the walk
        ["sh", "-c", f"sleep {timeout}; kill -TERM -{child.pid} 2>/dev/null"], start_new_session=True
    )
    try:
        for raw in iter(child.stdout.readline, b""):
            at = time.monotonic() - started
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append((at, line))
            print(f"[{at:7.1f}] {line}", flush=True)
        return lines, child.wait()
    finally:
        watchdog.kill()
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()


def gaps(lines: list[tuple[float, str]], end: float, ignore: list[re.Pattern[str]]) -> list[Gap]:
    """Every silence: from the start to the first line, between lines, and from the last to the end;
    lines that match ``ignore`` neither end nor start one."""
    found, last_at, last = [], 0.0, "(start)"
    said = [(at, line) for at, line in lines if not any(pattern.search(line) for pattern in ignore)]
    for at, line in [*said, (end, "(exit)")]:
        found.append(Gap(round(at - last_at, 1), round(last_at, 1), last, line))
        last_at, last = at, line
    return sorted(found, key=lambda gap: gap.seconds, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(ROOT), help="the repository to clone (its HEAD)")
    parser.add_argument("--dest", type=Path, default=Path("/tmp/walk"))
    parser.add_argument("--overlay", action="append", default=[], help="a path to copy over the clone")
    parser.add_argument("--max-gap", type=float, default=15.0)
    parser.add_argument(
        "--ignore",
        action="append",
        help=f"a regex of lines that are not progress (default {DEFAULT_IGNORE!r})",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop the walk after this many s")
    parser.add_argument("--log", type=Path, help="also write the timestamped lines here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the walk's processes too (finally)
    if not os.environ.get("W2S_DATA_DIR"):
        parser.error("set W2S_DATA_DIR to the data directory (e.g. ../shared/data)")
    shutil.rmtree(args.dest, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", args.source, str(args.dest)], check=True)
    for path in args.overlay:
        shutil.copy2(Path(args.source) / path, args.dest / path)
    ignore = [re.compile(pattern) for pattern in (args.ignore or [DEFAULT_IGNORE])]
    # As a user's shell: no virtual environment active, no other W2S_ settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("W2S_") and k != "VIRTUAL_ENV"}
    env["W2S_DATA_DIR"] = str(Path(os.environ["W2S_DATA_DIR"]).resolve())
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    command = ["bash", "scripts/run-example.sh"]
    started = time.monotonic()
    lines, status = timed_lines(command, args.dest, env, args.timeout)
    total = time.monotonic() - started
    found = gaps(lines, total, ignore)
    ignored = sum(any(pattern.search(line) for pattern in ignore) for _, line in lines)

    print(f"\n$ cd {args.dest} && W2S_DATA_DIR={env['W2S_DATA_DIR']} {' '.join(command)}")
    print(f"exit {status}; {len(lines)} lines ({ignored} ignored) in {total:.0f} s; the longest silences:")
    for gap in found[:5]:
        print(f"  {gap.seconds:6.1f} s from {gap.at:6.1f} s, after: {gap.before[:100]!r}")
        print(f"  {'':6}   ended by: {gap.after[:100]!r}")
    if args.log:
        args.log.write_text("".join(f"[{at:7.1f}] {line}\n" for at, line in lines))
    if args.json:
        figures = {
            "command": f"W2S_DATA_DIR=... {' '.join(command)}",
            "exit": status,
            "total_s": round(total, 1),
            "lines": len(lines),
            "ignored_lines": ignored,
            "overlay": args.overlay,
            "longest_gaps": [asdict(gap) for gap in found[:5]],
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if status != 0:
        return status
    return 1 if found and found[0].seconds >= args.max_gap else 0


if __name__ == "__main__":
    sys.exit(main())
