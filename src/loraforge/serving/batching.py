"""Coalesce concurrent generation requests into batches run by one generation thread (no torch).

Requests that arrive while a batch is running, or within ``window_s`` of each other, are handed to
``run_batch`` together, so different adapters and the base model share one ``generate`` call
(PEFT mixed-adapter batches, FACTS_CPU.md §4). This is *static* batching: a batch runs until its
last row finishes; a request arriving mid-batch waits for the next one (no continuous batching).

Only requests with the same :attr:`Pending.key` share a batch: the same sampling settings, and a
seeded request always runs alone so that its output does not depend on who else was in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

END = object()  # put on a streaming sink after the last token of a row


@dataclass(eq=False)
class Pending:
    """One request waiting for (or being served by) a batch.

    Attributes:
        request: the prepared ``GenerationRequest``.
        key: requests with equal keys may share a batch.
        sink: for streaming, receives ``[token_id]`` lists, then :data:`END`; None otherwise.
        cancel: set to stop this row at its next token (client gone, stop string found).
        result: resolved with the ``GenerationResult`` or the exception for this row.
    """

    request: Any
    key: Any
    sink: queue.SimpleQueue[Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Future[Any] = field(default_factory=Future)

    def fail(self, exc: BaseException) -> None:
        """Resolve the row with ``exc`` (once) and close its stream."""
        if not self.result.done():
            self.result.set_exception(exc)
        if self.sink is not None:
            self.sink.put(END)

    def succeed(self, value: Any) -> None:
        """Resolve the row with ``value`` (once) and close its stream."""
        if not self.result.done():
            self.result.set_result(value)
        if self.sink is not None:
            self.sink.put(END)


class BatchScheduler:
    """A queue of :class:`Pending` rows and one daemon thread that runs them in batches.

    Args:
        run_batch: called on the scheduler thread with 1..``max_batch_size`` rows of equal key;
            must resolve every row (an exception it raises fails the rows it left unresolved).
        max_batch_size: most rows per batch.
        window_s: after the first row of a batch arrives, wait this long for company (0: take only
            what is already queued).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Pending]], None],
        *,
        max_batch_size: int = 8,
        window_s: float = 0.005,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = max(0.0, window_s)
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._held: list[Pending] = []  # taken from the queue but left for a later batch (other key)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.batches_run = 0  # counters for tests and the benchmark
        self.rows_run = 0
        self.largest_batch = 0

    def submit(self, pending: Pending) -> Pending:
        """Queue ``pending``; the thread starts on first use (no work at construction)."""
        if self._closed:
            raise RuntimeError("the batch scheduler is closed")
        self._ensure_thread()
        self._queue.put(pending)
        return pending

    def close(self) -> None:
        """Stop the thread after the running batch; queued rows fail."""
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="loraforge-batcher", daemon=True)
                self._thread.start()

    def _next_batch(self) -> list[Pending] | None:
        """Block for a first row, then gather rows of the same key for up to ``window_s``."""
        if self._held:
            first = self._held.pop(0)
        else:
            item = self._queue.get()
            if item is None:
                return None
            first = item
        batch: list[Pending] = [first]
        others: list[Pending] = []
        for row in self._held:  # rows held back earlier keep their order
            (batch if row.key == first.key and len(batch) < self.max_batch_size else others).append(row)
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # re-post the stop signal for the loop
                break
            (batch if item.key == first.key else others).append(item)
        self._held = others
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [row for row in batch if not row.cancel.is_set()]
            for row in batch:
                if row.cancel.is_set():
                    row.fail(CancelledRow())
            if not live:
                continue
            self.batches_run += 1
            self.rows_run += len(live)
            self.largest_batch = max(self.largest_batch, len(live))
            try:
                self._run_batch(live)
            except BaseException as exc:  # noqa: BLE001 - reported to each waiting row
                logger.exception("batch of %d failed", len(live))
                for row in live:
                    row.fail(exc)
        for row in self._held:
            row.fail(RuntimeError("the engine is shutting down"))


class CancelledRow(Exception):
    """The row was cancelled before its batch started."""


__all__ = ["END", "BatchScheduler", "CancelledRow", "Pending"]
