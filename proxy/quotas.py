"""Per-key limits from the keys file: generations at once, and tokens per minute.

A key over either limit gets 429 with Retry-After (Anthropic `rate_limit_error`, OpenAI
`rate_limit_exceeded`), which every agent retries after waiting. Only generations count: token
counts and the answers given without the model cost the slot nothing. Tokens are what the
slot spent: prompt tokens prefilled (not those read from the cache) plus tokens generated,
charged when a generation ends, so one long answer may overrun the minute it ends in.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from llamabridge.keys import Limits

from .errors import Rejected

WINDOW = 60.0
# No way to know when one of a key's generations ends: come back in a moment.
BUSY_RETRY_AFTER = 2


class Quotas:
    def __init__(self):
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._spent: dict[str, deque[tuple[float, int]]] = {}

    def acquire(self, user: str | None, limits: Limits) -> bool:
        """Count a generation of `user` as started; raises Rejected(429) over a limit. True if
        counted (then `release` it)."""
        if user is None or (limits.concurrent is None and limits.tokens_per_minute is None):
            return False
        now = time.monotonic()
        with self._lock:
            if limits.tokens_per_minute is not None:
                spent = self._window(user, now)
                used = sum(tokens for _, tokens in spent)
                if used >= limits.tokens_per_minute:
                    # When enough of the oldest tokens leave the window to come under the limit.
                    over, wait = used - limits.tokens_per_minute, WINDOW
                    for at, tokens in spent:
                        over -= tokens
                        if over < 0:
                            wait = at + WINDOW - now
                            break
                    raise Rejected(429, f"the key {user!r} used {used} tokens in the last minute, its limit is "
                                        f"{limits.tokens_per_minute} (tokens_per_minute in the keys file)",
                                   retry_after=max(1, math.ceil(wait)), code="rate_limit_exceeded")
            active = self._active.get(user, 0)
            if limits.concurrent is not None and active >= limits.concurrent:
                raise Rejected(429, f"the key {user!r} has {active} requests queued or running, its limit "
                                    "(concurrent in the keys file)", retry_after=BUSY_RETRY_AFTER, code="rate_limit_exceeded")
            self._active[user] = active + 1
        return True

    def release(self, user: str, tokens: int) -> None:
        """A counted generation ended, having spent `tokens`."""
        with self._lock:
            left = self._active.get(user, 1) - 1
            if left > 0:
                self._active[user] = left
            else:
                self._active.pop(user, None)
            if tokens > 0:
                self._spent.setdefault(user, deque()).append((time.monotonic(), tokens))

    def _window(self, user: str, now: float) -> deque[tuple[float, int]]:
        spent = self._spent.setdefault(user, deque())
        while spent and spent[0][0] <= now - WINDOW:
            spent.popleft()
        return spent
