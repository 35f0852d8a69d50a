"""Container healthcheck of a Celery worker: exit 0 if the worker in this container answers a ping.

Used by docker-compose.yml as ``python /app/docker/worker_healthcheck.py``. It broadcasts Celery's
``ping`` control command over the broker (``W2S_BROKER_URL``) and looks for a reply from a node on
this container's hostname (Celery names nodes ``<name>@<hostname>``), so it needs neither the
worker's app module nor its node name. The worker's main process answers even while its pool
child runs a long training stage; a worker that lost the broker, or hangs, does not.

Exit status: 0 healthy, 1 no reply from this host, 2 broker unreachable or misconfigured.
"""

from __future__ import annotations

import os
import socket
import sys

TIMEOUT_S = float(os.environ.get("W2S_HEALTHCHECK_TIMEOUT_S", "5"))


def main() -> int:
    broker_url = os.environ.get("W2S_BROKER_URL", "")
    if not broker_url:
        print("W2S_BROKER_URL is not set", file=sys.stderr)
        return 2
    from celery import Celery  # after the check: a missing variable is reported without the import

    app = Celery("w2s-healthcheck", broker=broker_url)
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_max_retries = 1
    try:
        replies = app.control.ping(timeout=TIMEOUT_S)
    except Exception as error:  # any broker error means "not healthy"; say which
        print(f"broker unreachable: {error}", file=sys.stderr)
        return 2
    hostname = socket.gethostname()
    nodes = [name for reply in replies for name in reply]
    if any(name.rpartition("@")[2] == hostname for name in nodes):
        return 0
    print(f"no worker on {hostname} answered a ping (answered: {sorted(nodes) or 'none'})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
