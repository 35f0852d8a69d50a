"""A stage in a process of its own: how full fine-tuning and LoRA stages run.

The stage worker's process is long-lived (worker/tasks.py): probe stages run in it and reuse what it
has loaded. A stage that loads and trains a whole backbone instead runs in a fresh process, so that
everything it allocated (GPU memory above all) is returned when it ends, whatever it did, and a crash
inside it (a segfault, the kernel's OOM killer) costs that attempt only, not the worker.

The fresh process comes from a fork server (``multiprocessing`` "forkserver"): a clean interpreter
started once per long-lived process, which imports torch, transformers and the stage code and then
forks one child per stage in milliseconds. It never initialises CUDA, so its children may, even
after the long-lived process has run probe stages on the GPU (forking that process itself would
hand the child a CUDA context it cannot use, and copy whatever threads held locked).

The child only computes: it runs :func:`w2s.stages.run_stage` and sends its progress, then its result
or its error, up a pipe. Claiming, heartbeats, progress writes, fencing and the outcome stay in the
long-lived process, exactly as for a stage run in-process; to stop the child (a cancel, a superseded
attempt) the parent says so, and its training stops at the next step. If the long-lived process dies
the fork server exits, and the child notices within a second and exits too.

This module is imported by the fork server: it imports nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

# What the fork server imports once, so that every stage's child starts with it loaded.
PRELOAD = ["torch", "transformers", "w2s.stages", "w2s.pipeline", "worker.isolation"]
# How often the parent looks at the cancel flag while the child is quiet (loading a model, say).
POLL_S = 0.5
# A stage told to stop (cancelled, or past its time limit) that has not stopped this long after is killed.
STOP_GRACE_S = 30.0
# How long a child that has sent its outcome may take to exit (and return its memory).
EXIT_WAIT_S = 60.0

_context: Any = None


class IsolatedStageLost(RuntimeError):
    """The stage's process ended without sending a result or an error (killed, or crashed)."""


def fork_server() -> Any:
    """The fork server context of this process (the server starts with :func:`start_fork_server` or
    the first stage that needs it)."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


def start_fork_server() -> None:
    """Start the fork server now, so that it has imported torch and the stage code (seconds) before
    the first full or LoRA stage arrives rather than on that stage's clock."""
    from multiprocessing import forkserver

    fork_server()
    try:
        forkserver.ensure_running()
    except Exception:  # the first stage that needs it tries again, and reports what fails
        logger.warning("could not start the fork server ahead of time", exc_info=True)


def stop_fork_server() -> None:
    """Stop this process's fork server and remove the temporary folder of its socket. Celery ends a
    pool process with ``os._exit``, which skips multiprocessing's own clean-up: without this, every
    replaced worker process would leave a ``pymp-*`` folder behind."""
    global _context
    if _context is None:
        return
    from multiprocessing import forkserver, util

    with contextlib.suppress(Exception):
        forkserver._forkserver._stop()  # type: ignore[attr-defined]
    # multiprocessing's own finalizer for the folder: it removes it and forgets it, once.
    for finalizer in list(util._finalizer_registry.values()):  # type: ignore[attr-defined]
        if getattr(finalizer, "_callback", None) is util._remove_temp_dir:  # type: ignore[attr-defined]
            with contextlib.suppress(OSError):
                finalizer()
    _context = None


@dataclass(frozen=True)
class PlugInLoss:
    """A plug-in loss as a stage's own process finds it: by name, by class, and its source hash."""

    name: str
    module: str
    qualname: str
    code_hash: str


def plug_in_loss(plan: Any) -> PlugInLoss | None:
    """The plan's loss when it is a plug-in (None: built in). The child is a fresh interpreter: it
    loads the plug-ins its settings and entry points name, as every process does; this also names
    the class of one registered otherwise (by a test, or a script calling register_loss), and the
    hash of its source here, which the child must compute too."""
    from w2s.losses import _lookup
    from w2s.stages import loss_code_hash

    code_hash = loss_code_hash(plan.loss)
    if code_hash is None:
        return None
    cls = _lookup(plan.loss.name)
    return PlugInLoss(plan.loss.name, cls.__module__, cls.__qualname__, code_hash)


def run_isolated(
    plan: Any,
    store_uri: str,
    callback: Callable[[Any], bool | None],
    *,
    stopped: Callable[[], bool] = lambda: False,
    on_device: Callable[[str], None] | None = None,
    checkpoint_policy: Any = None,
) -> Any:
    """Run ``w2s.stages.run_stage(plan, ArtifactStore(store_uri))`` in a fresh process; return its
    StageResult or raise its error here. ``callback`` sees every progress report, as in-process;
    once it returns False or ``stopped()`` is true, the child is told to stop; once it answers
    w2s.resume.YIELD, to write a checkpoint and yield (w2s.resume.Yielded is raised here). ``on_device``
    gets the GPU's name when the stage runs on one."""
    from w2s.resume import YIELD

    context = fork_server()
    loss = plug_in_loss(plan)
    _use_stdlib_authkey()
    ours, theirs = context.Pipe()
    process = context.Process(
        target=child_main,
        args=(
            theirs,
            plan,
            store_uri,
            loss,
            dict(os.environ),
            list(sys.path),
            logging.getLogger().getEffectiveLevel(),
            checkpoint_policy,
        ),
        name=f"stage-{plan.kind}-{plan.seed}",
    )
    _start(process)
    theirs.close()  # the child holds its end: EOF here once the child is gone
    told_to_stop_at: float | None = None
    told_to_yield = False

    def tell_to_stop() -> None:
        nonlocal told_to_stop_at
        if told_to_stop_at is None:
            told_to_stop_at = time.monotonic()
            with contextlib.suppress(OSError):  # already gone: its end of the pipe says how
                ours.send("stop")

    ended = False  # the child sent its outcome, or its end of the pipe closed
    try:
        while True:
            if not ours.poll(POLL_S):
                if stopped():
                    tell_to_stop()
                if told_to_stop_at is not None and time.monotonic() - told_to_stop_at > STOP_GRACE_S:
                    # Stuck where no step reaches the stop (native code, a long evaluation): the
                    # process is killed below, and the stage ends as stopped.
                    from w2s.stages import StageCancelled

                    raise StageCancelled(f"{plan.kind} seed {plan.seed} did not stop within {STOP_GRACE_S} s")
                continue
            try:
                message, payload = ours.recv()
            except EOFError:
                ended = True
                break
            if message == "progress":
                answer = callback(payload)
                if answer is False or stopped():
                    tell_to_stop()
                elif answer == YIELD and not told_to_yield:
                    told_to_yield = True
                    with contextlib.suppress(OSError):
                        ours.send(YIELD)
            elif message == "device" and on_device is not None:
                on_device(payload)
            elif message == "result":
                ended = True
                return payload
            elif message == "error":
                ended = True
                error, trace = payload
                logger.info("stage %s seed %s raised in its own process:\n%s", plan.kind, plan.seed, trace)
                raise error
        process.join(EXIT_WAIT_S)
        raise IsolatedStageLost(
            f"the stage's own process ended without a result (exit code {process.exitcode})"
        )
    finally:
        ours.close()
        # Wait for it to exit, so that its memory (GPU memory above all) is free for the next stage;
        # leaving early (this process's own error), stop it at once.
        if ended:
            process.join(EXIT_WAIT_S)
        if process.is_alive():
            process.kill()
        process.join()


def _use_stdlib_authkey() -> None:
    """Give this process an authkey of multiprocessing's own type. In a Celery pool process it is
    billiard's, which refuses to be pickled outside billiard's own process start, and the fork server
    pickles it (with the Process object, which copies it) for every child."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    key = config.get("authkey")
    if key is not None and type(key) is not multiprocessing.process.AuthenticationString:
        config["authkey"] = multiprocessing.process.AuthenticationString(bytes(key))


def _start(process: Any) -> None:
    """Start the child even from a Celery pool process, which marks itself daemonic: multiprocessing
    refuses children to daemonic processes because it cannot clean them up when they exit, and this
    child cleans up after itself (it exits with its fork server, see _exit_with_parent)."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemonic = config.pop("daemon", None)
    try:
        process.start()
    finally:
        if daemonic is not None:
            config["daemon"] = daemonic


# -- in the child ------------------------------------------------------------------------------------


def child_main(
    conn: Connection,
    plan: Any,
    store_uri: str,
    loss: PlugInLoss | None,
    environ: dict[str, str],
    path: list[str],
    log_level: int,
    checkpoint_policy: Any = None,
) -> None:
    """Run the stage and report up ``conn``: ("device", name)?, ("progress", p)*, then ("result",
    StageResult) or ("error", (exception, traceback)). The parent may send "stop" or "yield"."""
    _exit_with_parent()
    os.environ.clear()
    os.environ.update(environ)  # the worker's settings now, not the fork server's when it started
    sys.path[:] = path  # ... and what it can import (a plug-in loss's module, say)
    logging.basicConfig(
        level=log_level, format=f"[%(asctime)s: %(levelname)s/stage-{os.getpid()}] %(name)s: %(message)s"
    )
    try:
        from w2s.stages import run_stage
        from w2s.store import ArtifactStore

        if loss is not None:
            use_plug_in_loss(loss, plan)
        if plan.device_kind == "cuda":
            import torch

            if torch.cuda.is_available():
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
                conn.send(("device", f"{torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES={visible})"))
        from w2s.resume import YIELD

        told: set[str] = set()

        def report(progress: Any) -> bool | str:
            conn.send(("progress", progress))
            while conn.poll():
                told.add(conn.recv())
            if "stop" in told:
                return False
            return YIELD if YIELD in told else True

        result = run_stage(
            plan, ArtifactStore(store_uri), callback=report, checkpoint_policy=checkpoint_policy
        )
        conn.send(("result", result))
    except Exception as error:
        conn.send(("error", (portable(error), traceback.format_exc())))
    finally:
        conn.close()


def use_plug_in_loss(loss: PlugInLoss, plan: Any) -> None:
    """Register the parent's plug-in loss in this process unless its plug-ins did, and refuse to run
    if its code here is not the code the parent (and the stage key) has: the file was edited since
    the worker loaded it."""
    import importlib

    from w2s.losses import _REGISTRY, register_loss
    from w2s.stages import StageError, loss_code_hash

    registered = _registered_class(loss.name)
    if registered is None or (registered.__module__, registered.__qualname__) != (loss.module, loss.qualname):
        try:
            found: Any = importlib.import_module(loss.module)
            for part in loss.qualname.split("."):
                found = getattr(found, part)
        except Exception as error:
            raise StageError(
                f"loss {loss.name!r}: its class {loss.module}.{loss.qualname} cannot be imported in the "
                f"stage's own process ({type(error).__name__}: {error}); define it in an importable "
                "module (README, 'Your own loss')"
            ) from None
        if _REGISTRY.get(loss.name) is not found:
            _REGISTRY.pop(loss.name, None)  # a same-named plug-in of this host's: the parent's wins
            register_loss(loss.name)(found)
    if loss_code_hash(plan.loss) != loss.code_hash:
        raise StageError(
            f"loss {loss.name!r}: its source ({loss.module}) changed on this host since the worker "
            "loaded it, and the stage key hashes the code that runs; restart the API and the workers "
            "so that all run the same loss code, then retry the job"
        )


def _registered_class(name: str) -> type | None:
    from w2s.losses import UnknownLoss, _lookup

    try:
        return _lookup(name)
    except UnknownLoss:
        return None


def portable(error: BaseException) -> BaseException:
    """The error itself if it survives the pipe (so the parent sorts it as in-process: bad input,
    cancelled, out of memory ...), else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _exit_with_parent() -> None:
    """Exit as soon as the fork server is gone (it exits with the long-lived process): a stage whose
    worker died is redelivered elsewhere, and this one must stop using the GPU."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
