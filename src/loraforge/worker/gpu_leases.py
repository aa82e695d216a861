"""GPU leases: a trainer gets GPUs of its own on this host, or waits for them.

Every worker on a host (threads of one worker, and other worker processes sharing
``$LORAFORGE_HOME``) leases a GPU by holding a non-blocking ``fcntl.flock`` on
``$LORAFORGE_HOME/run/gpu-leases/<hostname>/gpu-<id>.lock``. flock locks belong to the open
file, so two threads of one process exclude each other as two processes do, and the OS drops
them when the worker dies: a crashed worker never leaves a GPU leased. The worker holds the
lease while its trainer runs and starts the trainer with ``CUDA_VISIBLE_DEVICES`` set to the
leased GPUs, so the trainer's ``cuda:0`` (and, under ``accelerate launch``, rank ``i``'s
``cuda:i``) is a GPU no other trainer uses. Pure: no torch, no database.

The hostname is part of the path because ``$LORAFORGE_HOME`` may be shared storage: on NFS flock
is cluster-wide, so one ``gpu-0.lock`` for every host would make GPU 0 of host A block GPU 0 of
host B. Per-host directories keep the leases per host wherever the home lives.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

LOCKS_DIR = "run/gpu-leases"
# accelerate's default rendezvous port; a lease offsets it by its first GPU's slot in the pool.
BASE_RENDEZVOUS_PORT = 29500


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def locks_dir(home: Path) -> Path:
    """This host's lease directory under ``home`` (module docstring: why per host)."""
    return home / LOCKS_DIR / _safe(socket.gethostname())


def lock_path(home: Path, device_id: str) -> Path:
    """The lock file of GPU ``device_id`` (an index or a UUID) of this host under ``home``."""
    return locks_dir(home) / f"gpu-{_safe(device_id)}.lock"


class GpuLease:
    """GPUs held for one trainer; :meth:`release` (or leaving the ``with`` block) frees them."""

    def __init__(self, devices: tuple[str, ...], files: list[int], slot: int = 0) -> None:
        self.devices = devices
        self._fds = files
        # Position of the first leased GPU among the pool's: leases held at once on a host never
        # share a first GPU, so ports derived from it never collide.
        self.slot = slot

    def rendezvous_port(self) -> int:
        """A port for the FSDP ranks of this lease's trainer that no other leased trainer uses."""
        return BASE_RENDEZVOUS_PORT + self.slot

    def env(self) -> dict[str, str]:
        """What the trainer's environment must say so that it sees exactly the leased GPUs.

        The ids are in nvidia-smi's numbering (PCI bus order); CUDA numbers fastest-first unless
        told otherwise, so the order is pinned for an index to mean the same GPU.
        """
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def release(self) -> None:
        """Unlock and close every lock file (idempotent)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            # Closing the last descriptor of the open file drops its flock. One failing close
            # (EIO on a network filesystem) must not keep the others open.
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _try_lock(path: Path) -> int | None:
    """The locked descriptor of ``path``, or None when another holder has it.

    Raises:
        OSError: anything but "held by someone else" (the descriptor is closed first).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # non-inheritable: trainers don't get it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def try_acquire(home: Path, candidates: Sequence[str], count: int) -> GpuLease | None:
    """Lease ``count`` of the ``candidates`` GPUs (in their order), or none at all.

    Never blocks: a GPU another trainer holds is skipped, and if fewer than ``count`` are free
    whatever was taken is given back at once (holding part of a set while waiting for the rest
    could starve two jobs that each hold half). Likewise when a lock file cannot be opened or
    locked (a full disk, permissions, ENOLCK): every lock taken so far is released before the
    error propagates, so a failed attempt never leaves a GPU leased.

    Args:
        home: ``$LORAFORGE_HOME`` (shared by the workers of this host).
        candidates: the pool's GPU ids on this host (``planner.pools.pool_device_ids``).
        count: how many the trainer needs (the plan's ``num_gpus``, at least 1).

    Returns:
        The lease, or None when fewer than ``count`` GPUs are free now.

    Raises:
        ValueError: the pool has fewer GPUs than ``count`` on this host.
        OSError: a lock file could not be created, opened or locked (nothing is held then).
    """
    count = max(count, 1)
    if count > len(candidates):
        raise ValueError(f"the plan needs {count} GPUs and this host's pool has {list(candidates)}")
    held: list[tuple[str, int]] = []
    try:
        locks_dir(home).mkdir(parents=True, exist_ok=True)
        for device in candidates:
            fd = _try_lock(lock_path(home, device))
            if fd is None:
                continue
            held.append((device, fd))
            if len(held) == count:
                slot = list(candidates).index(held[0][0])
                lease = GpuLease(tuple(d for d, _ in held), [f for _, f in held], slot)
                log.info("leased GPU(s) %s", ",".join(lease.devices))
                return lease
    except BaseException:
        GpuLease((), [f for _, f in held]).release()
        raise
    GpuLease((), [f for _, f in held]).release()
    return None
