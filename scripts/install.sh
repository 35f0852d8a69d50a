#!/usr/bin/env bash
# Create .venv and install w2s with its dev tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# Pin torch first: a CPU machine takes the local 2.13.0 wheel instead of GBs of CUDA wheels.
pip install --quiet -c docker/constraints.txt "torch==2.13.0"
# The images' pins (docker/constraints.txt): tests run against the versions the images ship.
pip install --quiet -c docker/constraints.txt -e '.[dev]'
