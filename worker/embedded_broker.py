"""The embedded default's broker: kombu's filesystem transport, safe for several processes at once.

kombu's own filesystem transport (``kombu.transport.filesystem``) writes a message in place: it
creates the file in the queue folder, then writes it. A consumer that lists the folder between the
two reads an empty file and raises ``JSONDecodeError``, which Celery reports as "Unrecoverable
error" and stops the worker on (kombu issue #1551); the message is lost with it, because that reader
has already deleted the file the writer is still writing. A long job on ``w2s-service dev`` met it.
Here every step a writer and readers can race on is one atomic rename or link:

- **writing**: a message is written under a hidden name (one no reader takes for a message), then
  renamed to its queue name, so a reader finds the whole message or nothing;
- **reading**: a consumer claims a message by renaming it into the claim folder before reading it.
  One rename wins: two consumers on one folder (the embedded stack runs several) never both take
  it, and the file cannot be deleted under the other. (kombu's reader moves it to the system's
  temporary folder, a copy and a delete when that is another filesystem, where two readers can.)
  The claimed file is read under a shared lock, which waits for a writer of kombu's own kind (an
  exclusive lock while it writes). A file that still does not decode is put back under its name and
  skipped this time, so a message being written is read once it is whole; one still undecodable
  after ``torn_grace_s`` is moved to the broken folder and logged, never raised;
- **an exchange's bindings**: the table file is created whole (written under a hidden name, then
  linked into place), so a publisher never reads it empty.

``worker/celery_app.py`` uses it for the embedded default (``filesystem://``) under the alias
``w2s-filesystem``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

logger = logging.getLogger(__name__)

ALIAS = "w2s-filesystem"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:
        """Write ``payload`` whole, then give it its queue name (kombu's naming: the time first, for
        order; a uuid, so no two names meet)."""
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # In the queue folder itself (a rename stays on one filesystem), under a name no reader
        # lists as a message: "<first part>.<queue>.msg" is what kombu's readers match.
        staging = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(staging, "wb") as file:  # buffered: write() returns only when all is written
                file.write(str_to_bytes(dumps(payload)))
            os.rename(staging, final)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise ChannelError(f"Cannot add file {final!r} to directory: {error}") from error

    def _get(self, queue: str) -> dict[str, Any]:
        """The oldest whole message of ``queue``, claimed by this consumer alone; Empty if none."""
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            payload = self._claim(name)
            if payload is not None:
                return payload
        raise Empty()

    def _claim(self, name: str) -> dict[str, Any] | None:
        """Take message ``name`` and read it; None when another consumer took it first or it is not
        whole yet (then it is back in the queue folder, unless it stayed broken past the grace)."""
        queued = os.path.join(self.data_folder_in, name)
        claimed = os.path.join(self.claim_folder, name)
        try:
            os.rename(queued, claimed)
        except FileNotFoundError:
            return None  # another consumer claimed it between our listing and now
        except OSError as error:
            raise ChannelError(f"Cannot claim {queued!r}: {error}") from error
        try:
            with open(claimed, "rb") as file:
                # A writer of kombu's own kind holds an exclusive lock while it writes: wait for it.
                filesystem.lock(file, filesystem.LOCK_SH)
                try:
                    raw = file.read()
                finally:
                    filesystem.unlock(file)
        except OSError as error:
            raise ChannelError(f"Cannot read file {claimed!r} from queue: {error}") from error
        try:
            payload = loads(bytes_to_str(raw))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError: a prefix of a message
            payload = None
        try:
            if not isinstance(payload, dict):
                self._put_back(name, claimed, len(raw))
                return None
            os.unlink(claimed)
        except OSError as error:  # a filesystem fault, reported as kombu's own reader does
            raise ChannelError(f"Cannot move {claimed!r}: {error}") from error
        self._torn_since.pop(name, None)
        return payload

    def _put_back(self, name: str, claimed: str, size: int) -> None:
        """A message that does not decode: back in the queue for a later poll while its writer may
        still be at work, else (past the grace) into the broken folder, logged."""
        first_seen = self._torn_since.setdefault(name, time.monotonic())
        if time.monotonic() - first_seen < self.torn_grace_s:
            os.rename(claimed, os.path.join(self.data_folder_in, name))
            return
        self._torn_since.pop(name, None)
        broken = os.path.join(self.broken_folder, name)
        os.rename(claimed, broken)
        logger.error(
            "broker message %s did not decode for %.0f s (%d bytes); moved to %s and skipped",
            name,
            self.torn_grace_s,
            size,
            broken,
        )

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Bind ``queue``: a new table file appears whole; an existing one is updated in place under
        its exclusive lock, which readers wait for (kombu's own path)."""
        table = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        staging = table.with_name(f".{table.name}.{uuid.uuid4().hex}.tmp")
        try:
            staging.write_bytes(str_to_bytes(dumps([binding])))
            os.link(staging, table)  # fails if the table exists
            return
        except FileExistsError:
            pass
        except OSError as error:
            raise ChannelError(f"Cannot open {table}: {error}") from error
        finally:
            staging.unlink(missing_ok=True)
        super()._queue_bind(exchange, routing_key, pattern, queue)

    @cached_property
    def claim_folder(self) -> str:
        """Where a consumer moves a message it reads; on the queue folder's filesystem."""
        return self._folder("claim_folder", ".claimed")

    @cached_property
    def broken_folder(self) -> str:
        return self._folder("broken_folder", ".broken")

    @cached_property
    def torn_grace_s(self) -> float:
        """How long a message may stay undecodable before it is set aside: a writer of kombu's kind
        fills its file within milliseconds; one that died midway never will."""
        return float(self.transport_options.get("torn_grace_s", 30.0))

    @cached_property
    def _torn_since(self) -> dict[str, float]:
        return {}

    def _folder(self, option: str, default_name: str) -> str:
        folder = Path(self.transport_options.get(option) or Path(self.data_folder_in) / default_name)
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
