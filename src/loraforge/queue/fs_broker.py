"""kombu's filesystem transport with atomic publish and take: the embedded broker.

kombu's own ``_put`` creates the message file, then locks it, then writes it; its ``_get`` moves a
file out of the queue folder and reads it without taking that lock (a rename ignores ``flock``).
A consumer that polls between the producer's ``open`` and ``write`` takes an *empty* file: it
fails to decode it and the message is gone, and a producer thread in the worker itself (the
reaper re-sending a job) races the consumer thread of the same process. That lost the train task
of a re-queued job, which then sat ``queued`` until the reaper's next re-send (5 minutes).
``_get`` also "moves" into ``tempfile.gettempdir()`` when processed messages are not kept: on
another filesystem that is a copy, so two consumers can both read one message.

Here a message is written under a hidden name and renamed into the queue when complete, and a
consumer takes a message by renaming it into the processed folder (same filesystem, so exactly
one consumer wins) before reading it. Why not another embedded broker: kombu's SQLAlchemy
transport has no broadcast (``inspect``, ``revoke``; FACTS_CPU §5); a Redis server is what the
embedded default exists to avoid.
"""

from __future__ import annotations

import os
import uuid
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

# Celery's ``broker_transport`` for ``filesystem://`` (``queue/celery_app.py``).
TRANSPORT = "loraforge.queue.fs_broker:Transport"


class Channel(filesystem.Channel):
    """A filesystem channel whose messages are whole or absent (see the module docstring)."""

    # kombu's filesystem channel widens its base's ``_put(queue, message)`` the same way.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # A leading dot: consumers match ``<stamp>_<uuid>.<queue>.msg`` only.
        staging = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(staging, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
            os.rename(staging, final)
        except OSError as exc:
            try:
                os.unlink(staging)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        wanted = f"{queue}.msg"
        taken_dir = self.processed_folder
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            taken = os.path.join(taken_dir, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), taken)
            except FileNotFoundError:
                continue  # another consumer took it first
            try:
                with open(taken, "rb") as source:
                    payload = source.read()
                if not self.store_processed:
                    os.remove(taken)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {taken!r} from queue.") from exc
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):
    """The filesystem transport with :class:`Channel`."""

    Channel = Channel
