"""Is the prompt cache working? Per session, compare each turn with the one before.

A conversation grows at the end, so turn N+1's prompt should start with all of turn N's, and
llama-server should take that much from its slot cache (`timings.cache_n`). When it takes
less, something made the turn re-prefill: the prompt changed earlier than its end (the first
differing token says where), or the slot's cache was taken by another request, or the session
moved to another slot. Each such turn is logged once, with the reason, and counted.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

# llama-server re-evaluates the last prompt token even on a full hit, and templates may
# re-render the end of the previous turn (e.g. the assistant message's closing tokens).
TOLERANCE_TOKENS = 16


@dataclass(frozen=True)
class Turn:
    tokens: array
    slot: int


@dataclass(frozen=True)
class Finding:
    session: str
    expected: int  # tokens the cache should have supplied
    cached: int  # tokens it did supply
    first_difference: int  # first token where this prompt differs from the previous one
    reason: str

    @property
    def reprefilled(self) -> int:
        return self.expected - self.cached


def common_prefix(a: array, b: array) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on equal prefixes: O(n) compares, no Python loop per token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTracker:
    def __init__(self, max_sessions: int = 64):
        self._turns: OrderedDict[str, Turn] = OrderedDict()
        self._max = max_sessions
        self._lock = threading.Lock()

    def tokens_of(self, session: str) -> array | None:
        """The prompt of the session's last turn seen, if it is still remembered."""
        with self._lock:
            turn = self._turns.get(session)
        return None if turn is None else turn.tokens

    def observe(self, session: str, tokens: array, slot: int, cached: int, slot_taken_by_other: bool) -> Finding | None:
        """Record this turn; return a Finding if it re-prefilled more than its history explains."""
        with self._lock:
            previous = self._turns.pop(session, None)
            self._turns[session] = Turn(tokens, slot)
            while len(self._turns) > self._max:
                self._turns.popitem(last=False)
        if previous is None:
            return None
        shared = common_prefix(previous.tokens, tokens)
        expected = min(len(previous.tokens), len(tokens))
        if cached + TOLERANCE_TOKENS >= expected:
            return None
        if shared + TOLERANCE_TOKENS < expected:
            reason = f"the prompt changed at token {shared} of the previous turn's {len(previous.tokens)}"
        elif previous.slot != slot:
            reason = f"the session moved from slot {previous.slot} to slot {slot}"
        elif slot_taken_by_other:
            reason = f"slot {slot}'s cache was used by another request since the previous turn"
        else:
            reason = "llama-server did not reuse the cached prefix (cache evicted or --cache-reuse settings)"
        return Finding(session, expected, cached, shared, reason)
