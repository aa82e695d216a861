"""This machine's NVIDIA GPUs, from ``nvidia-smi``: bounded in time, shared, failures retried.

Never imports torch (the API process calls it). The API may call :func:`detect_gpus` while it
serves requests, so a hung ``nvidia-smi`` (a wedged driver does that) must not hang it: the
command runs in a daemon thread that is waited for at most ``DETECT_TIMEOUT_SECONDS``, then
killed and abandoned if it does not die either. A success is cached for the process's life (the
hardware does not change under us); a failure is not: it is retried at most every
``RETRY_SECONDS``, so a transient failure does not refuse every GPU model until a restart.
Concurrent first callers share one run (a lock), and what was found, or why nothing was, is
logged. A process that fixes its pools once at start (``serve``, ``worker``) calls
:func:`detect_gpus_at_start`, which retries a failure a few times and then raises rather than
answering "no GPU" for the process's whole life.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NVIDIA_SMI = ("nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits")
DETECT_TIMEOUT_SECONDS = 20.0
# After a kill, how long to wait for the process to go (a process in uninterruptible sleep never
# does: it is abandoned to its daemon thread).
KILL_WAIT_SECONDS = 2.0
RETRY_SECONDS = 60.0
# detect_gpus_at_start: a slow first nvidia-smi (driver still loading after boot, persistence
# mode off) often answers on a later try; a process start can afford to wait that long.
START_ATTEMPTS = 3
START_RETRY_PAUSE_SECONDS = 5.0
# A reading below this is not a usable GPU (a MIG slice or vGPU misreport, "0"): it is dropped.
MIN_GPU_GIB = 1.0


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: the id a child's ``CUDA_VISIBLE_DEVICES`` names it by, and its memory.

    ``id`` is the physical index in nvidia-smi's (PCI bus) order, or the UUID / MIG name
    ``CUDA_VISIBLE_DEVICES`` gave; either is what a trainer's ``CUDA_VISIBLE_DEVICES`` must say.
    """

    id: str
    memory_gib: float


class _State:
    """The process's detection result: a cached success, or when the last failure was."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gpus: tuple[Gpu, ...] | None = None
        self.failed_at: float | None = None


_STATE = _State()


def _run(cmd: tuple[str, ...], timeout: float) -> tuple[str | None, str]:
    """``cmd``'s stdout, or None and why; never waits longer than ``timeout + KILL_WAIT_SECONDS``.

    A missing ``nvidia-smi`` is an answer, not a failure: no NVIDIA driver, no GPU (stdout "").
    """
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
    except FileNotFoundError:
        return "", f"{cmd[0]} not found"
    except OSError as exc:
        return None, f"could not run {cmd[0]}: {exc}"
    result: dict[str, str] = {}

    def communicate() -> None:
        try:
            result["out"], result["err"] = proc.communicate()
        except (OSError, ValueError) as exc:  # the pipes were closed under it
            result["err"] = str(exc)

    # subprocess.run(timeout=...) kills on timeout and then waits without a bound; a thread we
    # can abandon is the only wait that is bounded whatever state the child is in.
    thread = threading.Thread(target=communicate, name="loraforge-nvidia-smi", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        proc.kill()
        thread.join(KILL_WAIT_SECONDS)
        return None, f"{cmd[0]} did not answer within {timeout:g} s (killed)"
    if proc.returncode != 0:
        said = (result.get("out", "") + result.get("err", "")).strip()
        if "No devices were found" in said:
            # A driver with no GPU behind it (exit code 6): an answer, like a missing nvidia-smi.
            return "", f"{cmd[0]}: no devices were found"
        return None, f"{cmd[0]} exited with {proc.returncode}: {result.get('err', '').strip()[:200]}"
    return result.get("out", ""), ""


def parse_memories(out: str) -> list[tuple[int, float]]:
    """(physical index, GiB) of each line of ``memory.total`` in MiB; unusable lines are dropped.

    A line that is not a number ("[N/A]", a warning) or reads below ``MIN_GPU_GIB`` is logged and
    skipped, keeping the other devices' indices (the index is the line's position).
    """
    memories = []
    for index, line in enumerate(out.strip().splitlines()):
        try:
            gib = round(float(line.strip()) / 1024, 1)
        except ValueError:
            log.warning("nvidia-smi: GPU %d: unreadable memory.total %r; not used", index, line[:80])
            continue
        if gib < MIN_GPU_GIB:
            log.warning("nvidia-smi: GPU %d reports %s MiB; not used for training", index, line.strip())
            continue
        memories.append((index, gib))
    return memories


def visible(memories: list[tuple[int, float]], cuda_visible: str | None) -> list[Gpu]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` leaves visible (nvidia-smi itself ignores it).

    Args:
        memories: (physical index, GiB) of the usable devices.
        cuda_visible: the ``CUDA_VISIBLE_DEVICES`` value, None when unset.

    Returns:
        The visible GPUs, in ``CUDA_VISIBLE_DEVICES`` order when it lists indices.
    """
    by_index = dict(memories)
    if cuda_visible is None:
        return [Gpu(str(i), gib) for i, gib in memories]
    items = [v.strip() for v in cuda_visible.split(",") if v.strip()]
    if not items or items[0] == "-1":
        return []
    if all(i.isdigit() for i in items):
        return [Gpu(i, by_index[int(i)]) for i in items if int(i) in by_index]
    # UUIDs or MIG names: the count is known, not which ones; size them all as the smallest.
    if not memories:
        return []
    smallest = min(by_index.values())
    return [Gpu(item, smallest) for item in items[: len(memories)]]


class GpuDetectionError(RuntimeError):
    """``nvidia-smi`` exists but did not answer (timeout, error exit): the GPUs are unknown."""


def _detect_locked(state: _State) -> str | None:
    """Run ``nvidia-smi`` once (caller holds ``state.lock``); None on an answer, else why not."""
    out, why = _run(NVIDIA_SMI, DETECT_TIMEOUT_SECONDS)
    if out is None:
        state.failed_at = time.monotonic()
        return why
    state.gpus = tuple(visible(parse_memories(out), os.environ.get("CUDA_VISIBLE_DEVICES")))
    state.failed_at = None
    found = ", ".join(f"cuda {g.id} {g.memory_gib:g} GiB" for g in state.gpus)
    log.info("GPU detection: %s", found or f"no usable GPU{f' ({why})' if why else ''}")
    return None


def detect_gpus() -> tuple[Gpu, ...]:
    """This machine's visible, usable GPUs; () when there is none or detection failed.

    Thread-safe; at most one ``nvidia-smi`` runs at a time and a success is reused. For the API,
    which plans while it serves: a failure answers () now and is retried later. A process that
    decides once, at start, what it serves must use :func:`detect_gpus_at_start` instead.
    """
    state = _STATE
    with state.lock:
        if state.gpus is not None:
            return state.gpus
        if state.failed_at is not None and time.monotonic() - state.failed_at < RETRY_SECONDS:
            return ()
        why = _detect_locked(state)
        if why is not None:
            log.warning("GPU detection failed (retried in %g s): %s", RETRY_SECONDS, why)
            return ()
        return state.gpus or ()


def detect_gpus_at_start(
    attempts: int = START_ATTEMPTS, pause_seconds: float = START_RETRY_PAUSE_SECONDS
) -> tuple[Gpu, ...]:
    """The GPUs, for a process that fixes its pools once at start (``serve``, ``worker``).

    Unlike :func:`detect_gpus`, a failed detection is not "no GPU": such a process would run
    CPU-only for its whole life (and, before dispatch kept such jobs queued, failed every job
    planned onto the GPU pool). So a failure is retried ``attempts`` times, ``pause_seconds``
    apart, and then raised. A missing ``nvidia-smi`` is an answer (no GPU), not a failure.

    Returns:
        The visible, usable GPUs (possibly none).

    Raises:
        GpuDetectionError: every attempt failed (timeout or error exit); the message says why.
    """
    state, why = _STATE, ""
    for attempt in range(1, max(attempts, 1) + 1):
        with state.lock:
            if state.gpus is not None:
                return state.gpus
            failed = _detect_locked(state)
            if failed is None:
                return state.gpus or ()
            why = failed
        log.warning("GPU detection failed (attempt %d of %d): %s", attempt, attempts, why)
        if attempt < attempts:
            time.sleep(pause_seconds)
    raise GpuDetectionError(f"GPU detection failed {attempts} times: {why}")


def forget() -> None:
    """Drop the cached result (tests; a later call detects again)."""
    with _STATE.lock:
        _STATE.gpus, _STATE.failed_at = None, None
