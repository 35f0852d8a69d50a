"""The images' pins: one constraints file for the CPU and the GPU image, written and checked here.

    python scripts/image_pins.py lock     # resolve pyproject's library and service dependencies for
                                          # the GPU image's platform; write docker/constraints.txt
    python scripts/image_pins.py check    # every pin resolves to a wheel for that platform (pip
                                          # download --no-deps), and the CPU image's torch exists

Both images install with ``-c docker/constraints.txt`` (and so does ``scripts/install.sh``), so two
separately built images, and the test environment, cannot drift apart: torch, transformers, peft and
everything under them are the same versions. The platform is the images' (python:3.11-slim-bookworm
on x86_64: CPython 3.11, glibc 2.36); the GPU image takes PyPI's Linux torch wheel, a CUDA 13.0
build that brings its CUDA libraries as nvidia-* wheels (pinned here too), and the CPU image takes
the same torch version from PyTorch's CPU index (``2.13.0+cpu`` satisfies the ``==2.13.0`` pin).

Both commands use only the package index, with pip's own configuration ignored (``--isolated``), so
a machine's local wheels or mirrors cannot make a pin look available that the image build would not
find.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
INDEX = "https://pypi.org/simple"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYTHON_VERSION = "3.11"
# What pip on the image accepts: CPython 3.11 wheels for glibc up to bookworm's 2.36, on x86_64.
PLATFORM_ARGS = [
    *(arg for n in range(5, 37) for arg in ("--platform", f"manylinux_2_{n}_x86_64")),
    *(arg for tag in ("2014", "2010", "1") for arg in ("--platform", f"manylinux{tag}_x86_64")),
    *("--platform", "linux_x86_64", "--implementation", "cp", "--python-version", PYTHON_VERSION),
    *(arg for abi in ("cp311", "abi3", "none") for arg in ("--abi", abi)),
    "--only-binary=:all:",
]
HEADER = """\
# Every package the images install, pinned: one file for the CPU and the GPU image (and the test
# environment, scripts/install.sh), so they cannot drift apart. Resolved for CPython {python} on
# manylinux x86_64 from {index};
# regenerate with `python scripts/image_pins.py lock` after changing pyproject.toml's dependencies,
# and check with `python scripts/image_pins.py check` (CI does).
# The GPU image's torch is PyPI's Linux wheel (CUDA 13.0: NVIDIA driver >= 580); the CPU image's is
# torch==2.13.0+cpu from {cpu_index}, which satisfies the same pin.
"""


# The service, object storage, and the trackers a control worker exports finished jobs to.
IMAGE_EXTRAS = ("service", "s3", "mlflow", "wandb")


def requirements() -> list[str]:
    """pyproject's library dependencies and the extras the images install (IMAGE_EXTRAS)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *(item for name in IMAGE_EXTRAS for item in extras[name])]


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True)


def lock() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        wanted = Path(tmp, "requirements.txt")
        wanted.write_text("\n".join(requirements()) + "\n")
        report = Path(tmp, "report.json")
        done = pip(
            "install", "--dry-run", "--ignore-installed", "--target", str(Path(tmp, "target")),
            "--index-url", INDEX, "--report", str(report), *PLATFORM_ARGS, "-r", str(wanted),
        )  # fmt: skip
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return done.returncode
        installed = json.loads(report.read_text())["install"]
    pins = sorted(f"{item['metadata']['name'].lower()}=={item['metadata']['version']}" for item in installed)
    header = HEADER.format(python=PYTHON_VERSION, index=INDEX, cpu_index=CPU_TORCH_INDEX)
    CONSTRAINTS.write_text(header + "\n".join(pins) + "\n")
    print(f"wrote {len(pins)} pins to {CONSTRAINTS.relative_to(ROOT)}")
    return 0


def pins() -> list[str]:
    lines = CONSTRAINTS.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def check() -> int:
    """Download every pinned wheel for the image's platform, without dependencies: a pin that
    names a version or a platform the index does not have fails here, not in an image build."""
    pinned = pins()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(tmp, "pins.txt")
        listed.write_text("\n".join(pinned) + "\n")
        done = pip(
            "download", "--no-deps", "--index-url", INDEX, "--dest", str(Path(tmp, "gpu")),
            *PLATFORM_ARGS, "-r", str(listed),
        )  # fmt: skip
        if done.returncode != 0:
            failures.append(f"GPU image ({INDEX}):\n{done.stderr.strip()[-3000:]}")
        else:
            count = len(list(Path(tmp, "gpu").iterdir()))
            print(f"GPU image: all {len(pinned)} pins resolve to a wheel on {INDEX} ({count} wheels)")
        torch_pin = next(pin for pin in pinned if pin.startswith("torch=="))
        cpu = pip(
            "download", "--no-deps", "--index-url", CPU_TORCH_INDEX, "--dest", str(Path(tmp, "cpu")),
            *PLATFORM_ARGS, torch_pin,
        )  # fmt: skip
        if cpu.returncode == 0:
            print(f"CPU image: {torch_pin} resolves on {CPU_TORCH_INDEX}")
        elif "No matching distribution" in cpu.stderr or "Could not find a version" in cpu.stderr:
            failures.append(
                f"CPU image: {torch_pin} is not on {CPU_TORCH_INDEX}:\n{cpu.stderr.strip()[-1500:]}"
            )
        else:
            # This machine may reach PyPI only; the CPU image's torch is then checked where it is built.
            print(f"CPU image: {CPU_TORCH_INDEX} is not reachable from here; {torch_pin}+cpu not checked")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["lock", "check"])
    return {"lock": lock, "check": check}[parser.parse_args().command]()


if __name__ == "__main__":
    raise SystemExit(main())
