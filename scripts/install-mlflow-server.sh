#!/usr/bin/env bash
# The MLflow tracking server the export tests start (tests/export_support.py), in a virtualenv of its
# own: the full mlflow package pins pandas<3 and pyarrow<26, below the images' pins. Pinned: the newest
# that installs from PyPI here. ~70 s and ~850 MB the first time; skipped when current. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
MLFLOW_SERVER_VERSION=3.17.2
MLFLOW_SERVER=.venv/mlflow-server
if [ "$("$MLFLOW_SERVER/bin/mlflow" --version 2>/dev/null)" != "mlflow, version $MLFLOW_SERVER_VERSION" ]; then
  echo "  the MLflow $MLFLOW_SERVER_VERSION server for the export tests, in $MLFLOW_SERVER (~70 s the first time)"
  python3 -m venv "$MLFLOW_SERVER"
  "$MLFLOW_SERVER/bin/pip" install --quiet --disable-pip-version-check "mlflow==$MLFLOW_SERVER_VERSION"
fi
