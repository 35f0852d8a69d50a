"""``w2s-service``: run the service's processes and administer teams.

    w2s-service dev                      # migrate, then API + workers + control + exports + dispatcher
    w2s-service migrate | api | worker --queue Q | dispatcher
    w2s-service create-team NAME         # prints the team's first API key (shown once)
    w2s-service create-key TEAM_NAME
    w2s-service teams | keys TEAM | revoke-key KEY_ID | audit
    w2s-service team-set TEAM [--weight W] [--gpu-quota N] [--max-priority P] [--disable | --enable] ...
    w2s-service jobs [--team TEAM] [--status S] | cancel-job JOB_ID

This module is the composition root: the one place that knows all of api/, worker/ and service/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from w2s.safe_text import terminal_safe

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("w2s_service")


def say(line: str = "", *, error: bool = False) -> None:
    """Print one line to stdout (stderr: ``error``) with control, bidi and invisible characters
    escaped: the lines hold names and messages from users and from rows written before names were
    checked, which must not move the cursor, recolour or rewrite an administrator's terminal."""
    print(terminal_safe(line), file=sys.stderr if error else sys.stdout)


def wait_for_database(timeout_s: float) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError
    from tenacity import RetryError, retry_if_exception_type, stop_after_delay, wait_fixed
    from tenacity import Retrying as Retry

    from service.db import get_engine

    def ping() -> None:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))

    try:
        Retry(
            retry=retry_if_exception_type(OperationalError),
            wait=wait_fixed(1.0),
            stop=stop_after_delay(timeout_s),
        )(ping)
    except RetryError as error:
        raise SystemExit(
            f"database not reachable after {timeout_s:.0f}s: {error.last_attempt.exception()}"
        ) from None


def migrate(timeout_s: float = 60.0) -> None:
    from alembic import command
    from alembic.config import Config

    from service.settings import get_settings

    wait_for_database(timeout_s)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = get_settings().database_url
    config.attributes["configure_logger"] = False  # ours (service/logs.py), without alembic's INFO lines
    command.upgrade(config, "head")


def cmd_migrate(args: argparse.Namespace) -> int:
    migrate(args.wait)
    say("database is at the latest schema")
    return 0


def prepare_multiprocess_metrics(folder: Path) -> None:
    """Prometheus multiprocess mode for this process and those it starts (service/telemetry.py):
    each writes its metrics under ``folder``, emptied first (a previous run's files would count
    again). Set before prometheus_client is imported, which reads it once."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.settings import get_settings

    settings = get_settings()
    if not settings.session_secret:  # one line here, not uvicorn's traceback from the app's start-up
        raise ValueError(
            "W2S_SESSION_SECRET is not set: the dashboard's session cookie needs a secret of your own "
            "(for example `export W2S_SESSION_SECRET=$(openssl rand -hex 32)`), or W2S_ENVIRONMENT="
            "development for the published development secret"
        )
    if settings.api_workers > 1:
        # Each server process writes its metrics here; /metrics in any of them sums them all.
        prepare_multiprocess_metrics(settings.state_dir / "metrics" / f"api-{os.getpid()}")
    # "auto" picks uvloop and httptools (dependencies; measured up to 5% less CPU per read than asyncio
    # and h11) and falls back to those where uvloop cannot be installed (Windows).
    uvicorn.run(
        "api.main:create_app",
        factory=True,  # built in each worker process, from its settings
        host=args.host,
        port=args.port,
        workers=settings.api_workers,
        loop="auto",
        http="auto",
        timeout_keep_alive=settings.api_keep_alive_s,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
        log_level="info",
    )
    return 0


def worker_argv(
    queue: str, embedded: bool, control_concurrency: int = 2, export_concurrency: int = 4
) -> list[str]:
    """Celery's worker arguments beyond the app's config (worker/celery_app.py): the queue, a host
    name, and for the control queue a child that serves many tasks (planning is light on memory and
    its caches of datasets and tokenizers are worth keeping); the exports queue likewise, with as many
    processes as exports may wait on tracking servers at once."""
    from worker.celery_app import CONTROL_QUEUE, EXPORTS_QUEUE

    argv = ["worker", "--queues", queue, "--hostname", f"{queue}-{os.getpid()}@%h", "--loglevel", "INFO"]
    if queue == CONTROL_QUEUE:
        argv += ["--max-tasks-per-child", "100", "--concurrency", str(control_concurrency)]
    if queue == EXPORTS_QUEUE:
        argv += ["--max-tasks-per-child", "100", "--concurrency", str(export_concurrency)]
    if embedded:
        # The filesystem transport has no broadcast: skip the worker-to-worker chatter.
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    settings = get_settings()
    if settings.metrics_port:
        # Before anything creates a metric: the pool's processes write theirs where this one reads.
        prepare_multiprocess_metrics(settings.state_dir / "metrics" / f"worker-{os.getpid()}")
        from service import telemetry

        telemetry.serve(settings.metrics_port)
    from worker import tasks
    from worker.celery_app import CONTROL_QUEUE, EXPORTS_QUEUE, app

    # Control and export workers run no stage: no fork server, no registration as a stage worker.
    tasks.RUNS_STAGES = bool(set(args.queue.split(",")) - {CONTROL_QUEUE, EXPORTS_QUEUE})
    if tasks.RUNS_STAGES:  # the dispatcher routes stages to workers that compute the planner's keys
        import socket

        from worker.registration import Registration

        Registration(f"{args.queue}-{os.getpid()}@{socket.gethostname()}", args.queue.split(",")).start()
    app.worker_main(
        worker_argv(
            args.queue, settings.embedded_broker, settings.control_concurrency, settings.export_concurrency
        )
    )
    return 0


def cmd_dispatcher(args: argparse.Namespace) -> int:
    from worker.dispatcher import run_dispatcher

    stop = _stop_on_signals()
    run_dispatcher(stop=stop)
    return 0


def _stop_on_signals():  # type: ignore[no-untyped-def]
    import threading

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def visible_gpus(settings: Any) -> list[str]:
    """The GPUs this machine lets the service use: CUDA_VISIBLE_DEVICES where set, else every GPU
    torch sees (asked only when the settings name GPU queues)."""
    from service.scheduler import gpu_queues

    if not gpu_queues(settings.queue_slots, settings.gpu_classes):
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def stage_workers(
    queue_slots: dict[str, int], gpu_classes: dict[str, float], gpus: list[str]
) -> list[tuple[str, dict[str, str]]]:
    """One stage worker process per slot of each queue, with its environment: a GPU queue's worker
    sees exactly one GPU of its own (CUDA_VISIBLE_DEVICES), so N slots on N GPUs use N GPUs rather
    than N processes on GPU 0; CPU workers see none. ValueError when there are fewer GPUs than
    GPU slots."""
    from service.scheduler import gpu_queues

    gpu_names = [name for _, name in gpu_queues(queue_slots, gpu_classes)]
    wanted = sum(queue_slots[name] for name in gpu_names)
    if wanted > len(gpus):
        raise ValueError(
            f"W2S_QUEUE_SLOTS asks for {wanted} GPU worker(s) ("
            + ", ".join(f"{name}: {queue_slots[name]}" for name in gpu_names)
            + f") but this machine offers {len(gpus)} GPU(s)"
            + (
                f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                if "CUDA_VISIBLE_DEVICES" in os.environ
                else ""
            )
            + '; one worker runs on one GPU: lower the slots, or use {"cpu": 1} on a machine without GPUs'
        )
    free = iter(gpus)
    workers: list[tuple[str, dict[str, str]]] = []
    for queue, slots in queue_slots.items():
        for _ in range(slots):
            device = next(free) if queue in gpu_names else ""
            workers.append((queue, {"CUDA_VISIBLE_DEVICES": device}))
    return workers


def dev_key_lines() -> list[str]:
    """What ``dev`` says about API keys, having made one: on a fresh database a first team
    ("default") and its key; later, a new key for "default" (else for the newest enabled team), so
    that each start prints a key that works (the first one was shown once, long scrolled away)."""
    from sqlalchemy import select

    from service import admin
    from service.db import session_scope
    from service.models import Team

    with session_scope() as session:
        teams = list(session.scalars(select(Team).order_by(Team.created_at.desc())))
        if not teams:
            _, key = admin.new_team(session, actor="dev", name="default")
            return [f"created team 'default'; its API key (shown once): {key}"]
        enabled = [team for team in teams if team.disabled_at is None]
        if not enabled:
            return [
                f"every team is disabled; enable one (w2s-service team-set {teams[0].name} --enable), "
                f"then make a key for it: w2s-service create-key {teams[0].name}"
            ]
        team = next((team for team in enabled if team.name == "default"), enabled[0])
        _, key = admin.new_key(session, team=team, name="w2s-service dev", actor="dev")
        lines = [
            f"team '{team.name}' exists; a new API key for it (shown once; its earlier keys still work, "
            f"`w2s-service keys {team.name}` lists them): {key}"
        ]
        others = [other.name for other in teams if other is not team]
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            lines.append(f"other teams: {shown}; a key for one: w2s-service create-key {others[0]}")
        return lines


def cmd_dev(args: argparse.Namespace) -> int:
    """Everything in one command, on the embedded default unless settings say otherwise. It runs in
    the foreground until Ctrl-C: use another terminal (or `&`) for the commands that follow."""
    # A development stack: the published development secrets work here, and only here.
    os.environ.setdefault("W2S_ENVIRONMENT", "development")
    from service.db import reset_caches
    from service.settings import get_settings
    from worker.celery_app import CONTROL_QUEUE, EXPORTS_QUEUE

    reset_caches()
    settings = get_settings()
    if port_in_use(args.host, args.port):
        raise SystemExit(
            f"w2s-service: port {args.port} on {args.host} is in use by another program; "
            "choose another with --port (or W2S_PORT for scripts/run-example.sh)"
        )
    migrate()
    keys = dev_key_lines()
    me = [sys.executable, "-m", "w2s_service.cli"]
    try:
        workers = stage_workers(settings.queue_slots, settings.gpu_classes, visible_gpus(settings))
    except ValueError as error:
        raise SystemExit(f"w2s-service: {error}") from None
    commands: list[tuple[list[str], dict[str, str]]] = [
        ([*me, "api", "--host", args.host, "--port", str(args.port)], {}),
        ([*me, "dispatcher"], {}),
        ([*me, "worker", "--queue", CONTROL_QUEUE], {"CUDA_VISIBLE_DEVICES": ""}),
        ([*me, "worker", "--queue", EXPORTS_QUEUE], {"CUDA_VISIBLE_DEVICES": ""}),
        *(([*me, "worker", "--queue", queue], env) for queue, env in workers),
    ]
    from w2s_service.supervise import Supervisor

    # Each process that exits is started again; the log lines name it by its arguments.
    children = Supervisor(
        [(" ".join(command[len(me) :]), command, {**os.environ, **env}) for command, env in commands]
    )
    say(f"w2s-service: API and dashboard on http://{args.host}:{args.port} (API docs at /docs)")
    say(f"w2s-service: state in {settings.state_dir}; database {settings.database_url}")
    say(f"w2s-service: admin key {settings.admin_key!r} (development only; production sets W2S_ADMIN_KEY)")
    for line in keys:
        say(f"w2s-service: {line}")
    if settings.data_dir is None:
        say(
            "w2s-service: W2S_DATA_DIR is not set, so registry datasets (sst2, sciq, ...) load from the "
            "Hugging Face hub, which needs internet; offline, set W2S_DATA_DIR to a directory of "
            "<name>/<split>.jsonl files (this checkout's ../shared/data) and restart",
            error=True,
        )
    else:
        say(f"w2s-service: datasets from {settings.data_dir}")
    say("w2s-service: running in the foreground; Ctrl-C stops every process")
    stop = _stop_on_signals()
    try:
        children.run(stop)
    finally:
        children.stop_all()
    return 0


def cmd_create_team(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    with session_scope() as session:
        team, key = admin.new_team(
            session,
            actor="cli",
            name=args.name,
            weight=args.weight,
            gpu_quota=args.gpu_quota,
            allow_trust_remote_code=args.allow_trust_remote_code,
        )
        say(f"team {team.name} ({team.id})")
        say(f"api key (shown once): {key}")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    with session_scope() as session:
        team = admin.team_by_name_or_id(session, args.team)
        _, key = admin.new_key(session, team=team, name=args.name, actor="cli")
        say(f"team {team.name} ({team.id})")
        say(f"api key (shown once): {key}")  # as create-team prints it: one recipe reads both
    return 0


LIMIT_FLAGS = (
    "weight",
    "gpu_quota",
    "max_priority",
    "max_queued_stages",
    "max_stages_per_job",
    "max_stages_per_sweep",
    "upload_quota_mb",
    "max_uploads",
    "storage_quota_mb",
    "stage_time_limit_s",
    "requests_per_minute",
    "max_streams_per_team",
)


EXPORT_FLAGS = (
    ("--mlflow-uri", "mlflow_tracking_uri", "export its jobs to this MLflow tracking server"),
    ("--mlflow-token-env", "mlflow_token_env", "the workers' environment variable holding its MLflow token"),
    ("--wandb-project", "wandb_project", "export its jobs to this Weights & Biases project"),
    ("--wandb-entity", "wandb_entity", "the W&B entity of that project"),
    ("--wandb-key-env", "wandb_key_env", "the workers' environment variable holding its W&B API key"),
)


def cmd_teams(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope
    from service.settings import get_settings
    from service.storage import MB, storage_of
    from service.usage import preemptions_by_team

    settings = get_settings()
    with session_scope() as session:
        teams = admin.list_teams(session)
        storage = storage_of(session, teams, settings)
        preempted = preemptions_by_team(session, settings, [team.id for team in teams])
        for team in teams:
            own = [*LIMIT_FLAGS, *(name for _, name, _ in EXPORT_FLAGS)]
            limits = ", ".join(
                f"{name}={getattr(team, name)}" for name in own if getattr(team, name) is not None
            )
            state = f"disabled {team.disabled_at:%Y-%m-%d %H:%M}" if team.disabled_at else "enabled"
            held = storage[team.id]
            used = f"storage {held.total_bytes / MB:,.1f}/{held.quota_bytes / MB:,.0f} MB"
            gave_way = f"preempted {preempted.get(team.id, 0)}x/{settings.fair_share_window_h:g}h"
            say(f"{terminal_safe(team.name):<24} {team.id}  {state}  {used}  {gave_way}  {limits}")
    return 0


def cmd_team_set(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    changes = {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}
    for _, name, _ in EXPORT_FLAGS:
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name) or None  # "": back to the setting
    with session_scope() as session:
        team = admin.team_by_name_or_id(session, args.team)
        if changes:
            admin.update_team(session, team=team, changes=changes, actor="cli")
        if args.disable or args.enable:
            cancelled = admin.set_team_disabled(session, team=team, disabled=args.disable, actor="cli")
            state = "disabled" if args.disable else "enabled"
            jobs = f"{cancelled} open job{'s' if cancelled != 1 else ''} cancelled" if args.disable else ""
            say(f"team {team.name} {state}" + (f"; {jobs}" if jobs else ""))
        if changes or not (args.disable or args.enable):
            say(
                f"team {team.name}: "
                + (", ".join(f"{k}={v}" for k, v in changes.items()) or "no limits changed")
            )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    with session_scope() as session:
        team = admin.team_by_name_or_id(session, args.team)
        for key in admin.list_keys(session, team=team):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            say(f"{key.id}  {key.prefix}...  {terminal_safe(key.name or '-'):<16} {state}")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    with session_scope() as session:
        admin.revoke_key(session, key_id=args.key_id, actor="cli")
    say(f"key {args.key_id} revoked")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope
    from service.jobs import list_job_summaries

    with session_scope() as session:
        team_id = admin.team_by_name_or_id(session, args.team).id if args.team else None
        rows, _ = list_job_summaries(session, team_id=team_id, status=args.status, limit=args.limit)
        teams = {team.id: team.name for team in admin.list_teams(session)}
        for row in rows:
            progress = f"{row.n_done}/{row.n_stages}"
            owner = terminal_safe(teams.get(row.team_id, row.team_id))  # escaped before padding
            created = f"{row.created_at:%Y-%m-%d %H:%M}"
            say(f"{row.id}  {owner:<20} {row.status:<9} {progress:>9}  {created}  {row.name}")
    return 0


def cmd_cancel_job(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    with session_scope() as session:
        admin.cancel_any_job(session, job_id=args.job_id, actor="cli")
    say(f"job {args.job_id} cancelled")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.workers import list_workers

    with session_scope(read_only=True) as session:
        workers = list_workers(session)
    for worker in workers:
        state = "draining" if worker["draining_since"] else "alive" if worker["alive"] else "gone"
        name, queues = terminal_safe(worker["name"]), ",".join(worker["queues"])  # escaped before padding
        say(f"{name:<48} {queues:<16} {state:<9} {worker['running']} running")
    if not workers:
        say("no worker reported itself in the last day")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Ask a worker's running stages to checkpoint and hand themselves back; the worker then exits."""
    from service import admin
    from service.db import session_scope
    from service.errors import NotFound

    try:
        with session_scope() as session:
            asked = admin.drain_worker(session, name=args.worker, actor="cli")
    except NotFound as error:
        say(f"error: {error}", error=True)
        return 1
    say(
        f"draining {args.worker}: {len(asked)} running stage(s) asked to write a checkpoint and hand "
        "themselves back; it takes no new stage and exits when they have (`w2s-service workers` shows it)"
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from service import admin
    from service.db import session_scope

    with session_scope() as session:
        for entry in reversed(admin.audit_entries(session, limit=args.limit)):
            when = f"{entry.at:%Y-%m-%d %H:%M:%S}"
            say(f"{when}  {entry.actor:<8} {entry.action:<14} {entry.target}  {entry.details or ''}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0 when every invariant holds, 1 when a job breaks one (2: wedged, no round can repair it)."""
    from service import doctor
    from service.db import session_scope
    from service.settings import get_settings

    with session_scope(read_only=True) as session:
        result = doctor.checkup(session, get_settings(), grace_s=args.grace, outputs=True)
    if args.json:
        # JSON escapes every control character and, with ensure_ascii, every non-ASCII one.
        print(
            json.dumps(
                {
                    "healthy": result.healthy,
                    "checked_jobs": result.checked_jobs,
                    "findings": [finding.to_dict() for finding in result.findings],
                },
                indent=2,
            )
        )
    else:
        for finding in result.findings:
            kind = "WEDGED " if finding.wedged else "overdue"
            say(f"{kind}  {finding.job_id}  {finding.job_status:<9} {finding.problem}: {finding.detail}")
        say(
            f"{result.checked_jobs} jobs checked: "
            + ("every invariant holds" if result.healthy else f"{len(result.findings)} findings")
        )
    if result.healthy:
        return 0
    return 2 if any(finding.wedged for finding in result.findings) else 1


def build_parser() -> argparse.ArgumentParser:
    from service.states import JobStatus

    parser = argparse.ArgumentParser(prog="w2s-service", description="Run and administer the w2s service")
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser(
        "dev", help="migrate, then run API, dispatcher and workers together (foreground; Ctrl-C stops)"
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=int(os.environ.get("W2S_PORT", "8000")), help="(8000)")
    dev.set_defaults(handler=cmd_dev)
    mig = commands.add_parser("migrate", help="wait for the database and upgrade it to the latest schema")
    mig.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the database")
    mig.set_defaults(handler=cmd_migrate)
    api = commands.add_parser("api", help="serve the REST API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument(
        "--forwarded-allow-ips",
        default=None,
        help="addresses of the reverse proxies whose X-Forwarded-For names the client (comma-separated, "
        "'*' for any); others' headers are ignored. Default: $FORWARDED_ALLOW_IPS, else 127.0.0.1. "
        "Failed authentications are counted per client address, so behind a proxy set this to its address",
    )
    api.set_defaults(handler=cmd_api)
    worker = commands.add_parser("worker", help="one worker process consuming one queue")
    worker.add_argument("--queue", required=True, help="cpu, gpu-80g, ..., control or exports")
    worker.set_defaults(handler=cmd_worker)
    commands.add_parser("dispatcher", help="the scheduling loop").set_defaults(handler=cmd_dispatcher)
    team = commands.add_parser("create-team", help="create a team and its first API key")
    team.add_argument("name")
    team.add_argument("--weight", type=float, default=1.0, help="fair-share weight")
    team.add_argument("--gpu-quota", type=int, default=None, help="concurrent GPU stages")
    team.add_argument("--allow-trust-remote-code", action="store_true")
    team.set_defaults(handler=cmd_create_team)
    key = commands.add_parser("create-key", help="a new API key for a team")
    key.add_argument("team")
    key.add_argument("--name", default="")
    key.set_defaults(handler=cmd_create_key)
    commands.add_parser("teams", help="every team, its state and its own limits").set_defaults(
        handler=cmd_teams
    )
    team_set = commands.add_parser(
        "team-set", help="change a team's weight, quota, limits; disable or enable it"
    )
    team_set.add_argument("team", help="name or id")
    for name in LIMIT_FLAGS:
        team_set.add_argument(
            f"--{name.replace('_', '-')}", type=float if name == "weight" else int, default=None
        )
    # Where its succeeded jobs are exported (service/exports.py); "" restores the setting's value.
    for flag, name, what in EXPORT_FLAGS:
        team_set.add_argument(flag, dest=name, default=None, help=what)
    switch = team_set.add_mutually_exclusive_group()
    switch.add_argument("--disable", action="store_true", help="keys stop working; open jobs are cancelled")
    switch.add_argument("--enable", action="store_true")
    team_set.set_defaults(handler=cmd_team_set)
    keys = commands.add_parser("keys", help="a team's API keys")
    keys.add_argument("team", help="name or id")
    keys.set_defaults(handler=cmd_keys)
    revoke = commands.add_parser("revoke-key", help="revoke an API key")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=cmd_revoke_key)
    jobs = commands.add_parser("jobs", help="jobs of any team, newest first")
    jobs.add_argument("--team", help="name or id (default: every team)")
    jobs.add_argument("--status", choices=[str(status) for status in JobStatus])
    jobs.add_argument("--limit", type=int, default=50)
    jobs.set_defaults(handler=cmd_jobs)
    cancel = commands.add_parser("cancel-job", help="cancel any team's job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel_job)
    commands.add_parser(
        "workers", help="workers seen in the last day: queues, state, stages running"
    ).set_defaults(handler=cmd_workers)
    drain = commands.add_parser(
        "drain",
        help="take a worker out of service without losing training: its running stages write a checkpoint "
        "and resume elsewhere, and it exits (SIGTERM to a worker does the same)",
    )
    drain.add_argument("worker", help="its name, as `w2s-service workers` lists it")
    drain.set_defaults(handler=cmd_drain)
    audit = commands.add_parser("audit", help="the latest admin actions")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(handler=cmd_audit)
    doc = commands.add_parser(
        "doctor", help="jobs that break a lifecycle invariant, and why (exit 0: none; 1: overdue; 2: wedged)"
    )
    doc.add_argument("--grace", type=float, default=60.0, help="seconds past a lease before work is overdue")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(handler=cmd_doctor)
    models = commands.add_parser("models", help="models in the artifact store").add_subparsers(
        dest="models_command", required=True
    )
    push = models.add_parser(
        "push",
        help="store a model directory in the artifact store once; print the store:<hash> reference "
        "that jobs name it by (every worker fetches it into its own cache)",
    )
    push.add_argument("directory", type=Path)
    push.add_argument("--name", default="", help="a label kept in the manifest (default: the folder's name)")
    push.set_defaults(handler=cmd_models_push)
    return parser


def cmd_models_push(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from w2s.model_store import model_manifest, push_model
    from w2s.store import ArtifactStore

    store = ArtifactStore(get_settings().store_uri)
    reference = push_model(args.directory, store, name=args.name)
    files = model_manifest(reference, store)["files"]
    size = sum(entry["size"] for entry in files) / 2**20
    say(f"pushed {args.directory} ({len(files)} files, {size:,.1f} MiB) to {store.uri}")
    say(f"use it in a job spec as: {reference}")
    say(reference)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Services log to files, not terminals: no download or weight-loading progress bars in them (set
    # before transformers is imported, here and in every process these commands start).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    from service.logs import configure_logging
    from service.settings import get_settings

    configure_logging(get_settings().log_format)
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from service.errors import ServiceError
    from service.states import InvalidTransition

    try:
        return args.handler(args)
    except (ValueError, ServiceError, InvalidTransition) as error:
        say(f"error: {error}", error=True)
        return 2
    except (OperationalError, ProgrammingError) as error:
        if _missing_table(error):
            from service.settings import get_settings

            say(
                f"error: the database ({get_settings().database_url}) has no tables yet: run "
                "`w2s-service migrate` first",
                error=True,
            )
            return 2
        raise


def _missing_table(error: Exception) -> bool:
    text = str(getattr(error, "orig", error)).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


if __name__ == "__main__":
    sys.exit(main())
