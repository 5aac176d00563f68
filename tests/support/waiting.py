"""Waiting for something another process does: poll until it holds, fail with what was seen.

Tests never sleep for a fixed time in place of this: a condition says what they wait for,
and a slow machine only makes them wait longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], timeout: float = 30, what: str | Callable[[], str] = "condition",
               interval: float = 0.02) -> T:
    """Poll `predicate()` until it returns something true, and return that. After `timeout`
    seconds, fail naming `what` (a string, or a function called then, e.g. for a log's tail)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
    return result
