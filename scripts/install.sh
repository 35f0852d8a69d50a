#!/usr/bin/env bash
# Create .venv and install w2s with its dev tools. Safe to re-run.
#
#   bash scripts/install.sh [extra ...]     # e.g. decoders: also the extras named in pyproject.toml
set -euo pipefail
cd "$(dirname "$0")/.."
echo "  .venv and the latest pip"
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# Pin torch first: a CPU machine takes the local 2.13.0 wheel instead of GBs of CUDA wheels.
echo "  torch 2.13.0"
pip install --quiet -c docker/constraints.txt "torch==2.13.0"
# The images' pins (docker/constraints.txt): tests run against the versions the images ship.
EXTRAS=$(IFS=,; echo "dev${*:+,$*}")
echo "  w2s, editable, with [$EXTRAS] and their dependencies"
# setuptools boxes a note into every editable install of a project with several top-level packages
# ("folders in your working directory with the same name as your package may take precedence"):
# here those folders are the packages themselves, so it says nothing. Filtered by its message only.
PYTHONWARNINGS="ignore:Editable installation" pip install --quiet -c docker/constraints.txt -e ".[$EXTRAS]"
# The MLflow server the export tests start, in a virtualenv of its own (scripts/install-mlflow-server.sh).
# W2S_MLFLOW_SERVER=later skips it (scripts/test.sh installs it in the background during the fast
# tier), and =no too (scripts/run-example.sh: the README's job needs no test server).
if [ "${W2S_MLFLOW_SERVER:-}" != later ] && [ "${W2S_MLFLOW_SERVER:-}" != no ]; then
  bash scripts/install-mlflow-server.sh
fi
