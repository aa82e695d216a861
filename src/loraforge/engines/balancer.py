"""Which replica of a base model gets the next request: least-loaded first, ties round-robin."""

from __future__ import annotations

import itertools
import threading


class ReplicaBalancer:
    """Least-loaded replica choice with round-robin tie-breaks, counted per URL in this process."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def order(self, urls: list[str]) -> list[str]:
        """``urls`` in the order to try them: fewest requests in flight first, rotating ties."""
        if len(urls) < 2:
            return list(urls)
        with self._lock:
            shift = next(self._turn) % len(urls)
            rotated = urls[shift:] + urls[:shift]
            return sorted(rotated, key=lambda url: self._in_flight.get(url, 0))  # stable: keeps rotation

    def acquire(self, url: str) -> None:
        """Count one more request in flight on ``url`` (pair with :meth:`release`)."""
        with self._lock:
            self._in_flight[url] = self._in_flight.get(url, 0) + 1

    def release(self, url: str) -> None:
        """One request on ``url`` is over."""
        with self._lock:
            self._in_flight[url] -= 1

    def in_flight(self, url: str) -> int:
        """Requests in flight on ``url`` now."""
        with self._lock:
            return self._in_flight.get(url, 0)


__all__ = ["ReplicaBalancer"]
