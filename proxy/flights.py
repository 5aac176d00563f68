"""Single flight: identical work asked for while it is already running waits for that run.

Used twice: a Claude Code session that retries a turn whose generation is still running gets
that generation's events (`followers.py`, keyed by session and body digest), and identical token
counts asked at the same time go to llama-server once (`tokens.py`, keyed by content).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any


class Flight:
    """Work in progress. `result` is set before `done`; None once done means it failed, and a
    waiter does the work itself or reports the failure."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None


class Flights:
    """Work in progress by key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Hashable, Flight] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

    def join(self, key: Hashable) -> tuple[Flight, bool]:
        """(flight, True) for the first request with this key, (its flight, False) for a repeat."""
        with self._lock:
            flight = self._by_key.get(key)
            if flight is not None and not flight.done.is_set():
                return flight, False
            flight = Flight()
            self._by_key[key] = flight
            return flight, True

    def finish(self, key: Hashable, flight: Flight, result: Any) -> None:
        flight.result = result
        flight.done.set()
        with self._lock:
            if self._by_key.get(key) is flight:
                del self._by_key[key]
