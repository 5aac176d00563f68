"""Admission control: at most one generation per llama-server slot, the rest wait their turn.

llama-server queues what it cannot run, but blindly: a background request can take the only
slot ahead of the conversation and evict its prompt cache. The gate admits at most `slots`
requests, hands each a slot id (passed upstream as `id_slot`), and keeps the others in a
bounded queue ordered by class priority; within a class, users (API key names) take turns,
the one served longest ago first, then arrival: one user's burst of subagents cannot starve
another's main turn. Requests of one session go back to the slot that holds their cache when
it is free.

Waiting is step-wise (`wait(waiter, timeout)`), so a streamed response can send pings to its
client between steps and notice when that client has gone.

Every request the gate holds, waiting or admitted, holds one of the server's threads for as long.
The gates of a process share a `Threads` budget smaller than the thread pool, so that health
checks, metrics, token counts, local answers and the dashboard always find a thread free: past
it a request is refused as if the queue were full, however many slots llama-server reports.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from .errors import ApiError


class QueueFull(ApiError):
    def __init__(self, depth: int, threads: int | None = None):
        if threads is None:
            message = f"llamabridge's queue is full ({depth} requests waiting for llama-server; QUEUE_MAX)"
        else:
            message = (f"llamabridge's queue is full ({threads} requests waiting for or holding a llama-server slot, "
                       "all the threads PROXY_THREADS leaves for them)")
        super().__init__(529, message, retry_after=10)


class QueueTimeout(ApiError):
    def __init__(self, waited: float):
        super().__init__(529, f"waited {waited:.0f}s for a free llama-server slot (QUEUE_TIMEOUT)", retry_after=10)


class Threads:
    """The server threads the gates may hold at once, waiting or generating: PROXY_THREADS less a
    reserve for requests that need no slot. Shared by the gates of one process (llama-server's
    and the background one's), which take from it under their own locks, never the reverse."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def take(self) -> bool:
        with self._lock:
            if self._held >= self.limit:
                return False
            self._held += 1
            return True

    def give(self) -> None:
        with self._lock:
            self._held -= 1


@dataclass
class Ticket:
    slot: int
    klass: str
    session: str | None
    waited: float
    previous: str | None = None  # who used this slot last: a session id, or "<class>" if none
    saving: bool = False  # a hold while llama-server saves the slot to disk (hold()): no request, no thread


@dataclass(eq=False)
class Waiter:
    priority: int
    seq: int
    klass: str
    session: str | None
    enqueued: float
    user: str | None = None
    ticket: Ticket | None = None
    cancelled: bool = False
    holds_thread: bool = True  # until it leaves without a ticket; a ticket gives the thread back on release


class Gate:
    def __init__(self, slots: int, queue_max: int, queue_timeout: float, threads: Threads | None = None):
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self.threads = threads or Threads(1 << 30)
        self._cond = threading.Condition()
        self._slots = max(1, slots)
        self._busy: dict[int, Ticket] = {}
        self._owner: dict[int, str] = {}  # slot -> session whose cache it holds
        self._last_used: dict[int, float] = {}
        self._last_user: dict[int, str] = {}
        self._queue: list[Waiter] = []
        self._seq = itertools.count()
        self._turn: dict[str | None, int] = {}  # user -> when they were last granted a slot (a grant count)
        self._grants = itertools.count()

    # -- state ----------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self._slots

    def resize(self, slots: int) -> None:
        """Follow llama-server's slot count (it may restart with another --parallel)."""
        with self._cond:
            if slots != self._slots and slots >= 1:
                self._slots = slots
                self._owner = {s: o for s, o in self._owner.items() if s < slots}
                self._grant()
                self._cond.notify_all()

    def depth(self) -> int:
        with self._cond:
            return sum(1 for w in self._queue if not w.cancelled and w.ticket is None)

    def in_flight(self) -> int:
        with self._cond:
            return sum(1 for t in self._busy.values() if not t.saving)

    def has_cold_free_slot(self) -> bool:
        """A free slot that holds no session's cache: running something there evicts nothing."""
        with self._cond:
            return any(s not in self._busy and s not in self._owner for s in range(self._slots))

    def hold(self, slot: int, session: str) -> Ticket | None:
        """Take `slot` while llama-server saves it to disk (kvcache.py), or None if that would
        make anyone wait who is not waiting already: the slot is busy, anyone is queued, or
        another request used it since `session` did (its cache is no longer the session's).
        While held, the session's next turn waits for it rather than go to another slot, at
        most for the save; others go to any other free slot."""
        with self._cond:
            if (slot >= self._slots or slot in self._busy or self._last_user.get(slot) != session
                    or any(not w.cancelled and w.ticket is None for w in self._queue)):
                return None
            ticket = Ticket(slot, "save", session, 0.0, session, saving=True)
            self._busy[slot] = ticket
            return ticket

    def last_user(self, slot: int) -> str | None:
        """Who used `slot` last, as Ticket.previous names them."""
        with self._cond:
            return self._last_user.get(slot)

    def forget(self, slots: set[int]) -> None:
        """llama-server lost what these slots held (it restarted): they hold nobody's cache."""
        with self._cond:
            for slot in slots:
                if slot not in self._busy:
                    self._owner.pop(slot, None)
                    self._last_user.pop(slot, None)

    def enqueue(self, klass: str, priority: int, session: str | None, user: str | None = None) -> Waiter:
        """Join the queue (granted at once if a slot is free). Raises QueueFull."""
        with self._cond:
            waiting = sum(1 for w in self._queue if not w.cancelled and w.ticket is None)
            free = self._slots - len(self._busy)
            if waiting >= self.queue_max and free <= waiting:
                raise QueueFull(waiting)
            if not self.threads.take():
                raise QueueFull(waiting, self.threads.limit)
            waiter = Waiter(priority, next(self._seq), klass, session, time.monotonic(), user)
            self._queue.append(waiter)
            self._grant()
            return waiter

    def wait(self, waiter: Waiter, timeout: float) -> Ticket | None:
        """The ticket once granted, or None after `timeout` seconds. Raises QueueTimeout past
        QUEUE_TIMEOUT."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while waiter.ticket is None:
                if waiter.cancelled:
                    raise RuntimeError("waiting on a waiter that left the queue")
                waited = time.monotonic() - waiter.enqueued
                if waited >= self.queue_timeout:
                    self._drop(waiter)
                    raise QueueTimeout(waited)
                remaining = min(deadline, waiter.enqueued + self.queue_timeout) - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return waiter.ticket

    def cancel(self, waiter: Waiter) -> None:
        """Leave the queue; if a ticket was granted in the meantime, give the slot back."""
        with self._cond:
            waiter.cancelled = True
            if waiter.ticket is not None:
                self._release(waiter.ticket)
            self._drop(waiter)
            self._cond.notify_all()

    def release(self, ticket: Ticket) -> None:
        with self._cond:
            self._release(ticket)
            self._cond.notify_all()

    # -- internals (lock held) --------------------------------------------------------------------

    def _release(self, ticket: Ticket) -> None:
        if self._busy.get(ticket.slot) is ticket:
            del self._busy[ticket.slot]
            if not ticket.saving:
                self.threads.give()
                self._last_used[ticket.slot] = time.monotonic()
            self._grant()

    def _drop(self, waiter: Waiter) -> None:
        waiter.cancelled = True
        if waiter.ticket is None and waiter.holds_thread:
            waiter.holds_thread = False
            self.threads.give()
        self._queue = [w for w in self._queue if w is not waiter]

    def _head(self) -> Waiter | None:
        """Who is next: the best class; in it, the user whose last turn is oldest (never is
        oldest); then the earliest. The queue is at most QUEUE_MAX long: a scan is cheap."""
        self._queue = [w for w in self._queue if not w.cancelled and w.ticket is None]
        if not self._queue:
            return None
        return min(self._queue, key=lambda w: (w.priority, self._turn.get(w.user, -1), w.seq))

    def _grant(self) -> None:
        """Give free slots to the waiters at the head of the queue."""
        while (head := self._head()) is not None:
            slot = self._choose_slot(head.session)
            if slot is None:
                return
            if len(self._turn) > 1024:  # forget users with nothing queued (keys are few; this is a bound)
                self._turn = {w.user: self._turn.get(w.user, -1) for w in self._queue}
            self._turn[head.user] = next(self._grants)
            head.ticket = Ticket(slot, head.klass, head.session, time.monotonic() - head.enqueued, self._last_user.get(slot))
            self._busy[slot] = head.ticket
            self._last_user[slot] = head.session or f"<{head.klass}>"
            if head.session is not None:
                for s, o in list(self._owner.items()):
                    if o == head.session and s != slot:
                        del self._owner[s]
                self._owner[slot] = head.session
            self._cond.notify_all()

    def _choose_slot(self, session: str | None) -> int | None:
        free = [s for s in range(self._slots) if s not in self._busy]
        if not free:
            return None
        if session is not None:
            mine = [s for s in free if self._owner.get(s) == session]
            if mine:
                return mine[0]
            if any(t.saving and self._owner.get(s) == session for s, t in self._busy.items()):
                return None  # its slot is being saved: wait for it rather than lose the cache

        # Prefer a slot holding nobody's cache, then the one whose cache is oldest.
        cold = [s for s in free if s not in self._owner]
        if cold:
            return cold[0]
        return min(free, key=lambda s: self._last_used.get(s, 0.0))
