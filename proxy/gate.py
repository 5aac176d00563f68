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
from collections import OrderedDict
from collections.abc import Callable
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
    slot: int  # llama-server's own slot id, on its upstream
    klass: str
    session: str | None
    waited: float
    previous: str | None = None  # who used this slot last: a session id, or "<class>" if none
    saving: bool = False  # a hold while llama-server saves the slot to disk (hold()): no request, no thread
    upstream: int = 0  # which llama-server (LLAMA_URL's order)

    @property
    def key(self) -> tuple[int, int]:
        return (self.upstream, self.slot)


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


# A slot: (upstream, llama-server's slot id).
Key = tuple[int, int]
SESSIONS_KEPT = 4096  # sessions whose upstream the gate remembers


class Gate:
    """One queue in front of every slot of every upstream (LLAMA_URL may list several
    llama-servers). A session stays on the upstream that holds its cache: when that upstream has
    no free slot it waits up to `affinity_wait` seconds before moving to another, and moves at
    once when its upstream is down (`set_up`). `on_move(session, from, to, why)` hears of each move."""

    def __init__(self, slots: int | list[int], queue_max: int, queue_timeout: float, threads: Threads | None = None,
                 affinity_wait: float = 30.0, on_move: Callable[[str, int, int, str], None] | None = None):
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self.affinity_wait = affinity_wait
        self.on_move = on_move
        self.threads = threads or Threads(1 << 30)
        self._cond = threading.Condition()
        self._counts = [max(1, n) for n in ([slots] if isinstance(slots, int) else slots)]
        self._up = [True] * len(self._counts)
        self._busy: dict[Key, Ticket] = {}
        self._owner: dict[Key, str] = {}  # slot -> session whose cache it holds
        # session -> the upstream that ran its last turn: its cache is there, in the slot or in
        # llama-server's host-memory cache, even once another session has taken the slot.
        self._home: OrderedDict[str, int] = OrderedDict()
        self._last_used: dict[Key, float] = {}
        self._last_user: dict[Key, str] = {}
        self._queue: list[Waiter] = []
        self._seq = itertools.count()
        self._turn: dict[str | None, int] = {}  # user -> when they were last granted a slot (a grant count)
        self._grants = itertools.count()
        self.moves = 0

    # -- state ----------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Slots on every upstream."""
        return sum(self._counts)

    def slots_of(self, upstream: int) -> int:
        return self._counts[upstream]

    @property
    def upstreams(self) -> int:
        return len(self._counts)

    def resize(self, slots: int, upstream: int = 0) -> None:
        """Follow llama-server's slot count (it may restart with another --parallel)."""
        with self._cond:
            if slots != self._counts[upstream] and slots >= 1:
                self._counts[upstream] = slots
                self._owner = {k: o for k, o in self._owner.items() if k[0] != upstream or k[1] < slots}
                self._grant()
                self._cond.notify_all()

    def set_up(self, upstream: int, up: bool) -> None:
        """An upstream left the rotation (down, loading) or came back. Waiting requests go to
        the others; its sessions move at their next turn."""
        with self._cond:
            if self._up[upstream] != up:
                self._up[upstream] = up
                self._grant()
                self._cond.notify_all()

    def is_up(self, upstream: int) -> bool:
        return self._up[upstream]

    def depth(self) -> int:
        with self._cond:
            return sum(1 for w in self._queue if not w.cancelled and w.ticket is None)

    def in_flight(self) -> int:
        with self._cond:
            return sum(1 for t in self._busy.values() if not t.saving)

    def in_flight_on(self, upstream: int) -> int:
        with self._cond:
            return sum(1 for k, t in self._busy.items() if k[0] == upstream and not t.saving)

    def has_cold_free_slot(self) -> bool:
        """A free slot that holds no session's cache: running something there evicts nothing."""
        with self._cond:
            return any(k not in self._busy and k not in self._owner for k in self._free_keys())

    def hold(self, slot: int, session: str, upstream: int = 0) -> Ticket | None:
        """Take `slot` while llama-server saves it to disk (kvcache.py), or None if that would
        make anyone wait who is not waiting already: the slot is busy, anyone is queued, or
        another request used it since `session` did (its cache is no longer the session's).
        While held, the session's next turn waits for it rather than go to another slot, at
        most for the save; others go to any other free slot."""
        key = (upstream, slot)
        with self._cond:
            if (slot >= self._counts[upstream] or key in self._busy or self._last_user.get(key) != session
                    or any(not w.cancelled and w.ticket is None for w in self._queue)):
                return None
            ticket = Ticket(slot, "save", session, 0.0, session, saving=True, upstream=upstream)
            self._busy[key] = ticket
            return ticket

    def last_user(self, slot: int, upstream: int = 0) -> str | None:
        """Who used `slot` last, as Ticket.previous names them."""
        with self._cond:
            return self._last_user.get((upstream, slot))

    def forget(self, slots: set[int], upstream: int = 0) -> None:
        """llama-server lost what these slots held (it restarted): they hold nobody's cache."""
        with self._cond:
            for slot in slots:
                key = (upstream, slot)
                if key not in self._busy:
                    self._owner.pop(key, None)
                    self._last_user.pop(key, None)

    def enqueue(self, klass: str, priority: int, session: str | None, user: str | None = None) -> Waiter:
        """Join the queue (granted at once if a slot is free). Raises QueueFull."""
        with self._cond:
            waiting = sum(1 for w in self._queue if not w.cancelled and w.ticket is None)
            free = len(self._free_keys())
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
                if len(self._counts) > 1:
                    # A session waiting for its upstream may move once it has waited affinity_wait:
                    # nothing else wakes the gate at that moment.
                    self._grant()
                    if waiter.ticket is not None:
                        break
                    remaining = min(remaining, 1.0)
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
        key = ticket.key
        if self._busy.get(key) is ticket:
            del self._busy[key]
            if not ticket.saving:
                self.threads.give()
                self._last_used[key] = time.monotonic()
            self._grant()

    def _drop(self, waiter: Waiter) -> None:
        waiter.cancelled = True
        if waiter.ticket is None and waiter.holds_thread:
            waiter.holds_thread = False
            self.threads.give()
        self._queue = [w for w in self._queue if w is not waiter]

    def _usable(self, upstream: int) -> bool:
        """In the rotation: up, or every upstream is down (then requests fail as they would with
        one llama-server, rather than wait for none)."""
        return self._up[upstream] or not any(self._up)

    def _free_keys(self) -> list[Key]:
        return [(u, s) for u, n in enumerate(self._counts) if self._usable(u) for s in range(n) if (u, s) not in self._busy]

    def _order(self) -> list[Waiter]:
        """Who is next: the best class; in it, the user whose last turn is oldest (never is
        oldest); then the earliest. The queue is at most QUEUE_MAX long: a sort is cheap."""
        self._queue = [w for w in self._queue if not w.cancelled and w.ticket is None]
        return sorted(self._queue, key=lambda w: (w.priority, self._turn.get(w.user, -1), w.seq))

    def _grant(self) -> None:
        """Give free slots to waiters in queue order. One waiting for its own upstream is passed
        over (for now) by those behind it, who can take a slot it would not."""
        while True:
            free = self._free_keys()
            if not free:
                return
            for waiter in self._order():
                key = self._choose_slot(waiter, free)
                if key is not None:
                    break
            else:
                return
            if len(self._turn) > 1024:  # forget users with nothing queued (keys are few; this is a bound)
                self._turn = {w.user: self._turn.get(w.user, -1) for w in self._queue}
            self._turn[waiter.user] = next(self._grants)
            waiter.ticket = Ticket(key[1], waiter.klass, waiter.session, time.monotonic() - waiter.enqueued,
                                   self._last_user.get(key), upstream=key[0])
            self._busy[key] = waiter.ticket
            self._last_user[key] = waiter.session or f"<{waiter.klass}>"
            if waiter.session is not None:
                for k, o in list(self._owner.items()):
                    if o == waiter.session and k != key:
                        del self._owner[k]
                self._owner[key] = waiter.session
                self._home[waiter.session] = key[0]
                self._home.move_to_end(waiter.session)
                if len(self._home) > SESSIONS_KEPT:
                    self._home.popitem(last=False)
            self._cond.notify_all()

    def _choose_slot(self, waiter: Waiter, free: list[Key]) -> Key | None:
        session = waiter.session
        if session is None:
            return self._least_loaded(free)
        own = next((k for k, o in self._owner.items() if o == session), None)
        if own is not None:
            if own in free:
                return own
            held = self._busy.get(own)
            if held is not None and held.saving:
                return None  # its slot is being saved: wait for it rather than lose the cache
        home = self._home.get(session)
        if home is None:
            return self._least_loaded(free)
        if self._usable(home):
            same = [k for k in free if k[0] == home]
            if same:
                return self._coldest(same)  # llama-server's own host-memory cache may bring it back
            if time.monotonic() - waiter.enqueued < self.affinity_wait:
                return None  # wait for the upstream that holds its cache
            why = f"waited {self.affinity_wait:g}s (AFFINITY_MAX_WAIT) for upstream {home}"
        else:
            why = f"upstream {home} is down"
        key = self._least_loaded(free)
        self.moves += 1
        if self.on_move is not None:
            self.on_move(session, home, key[0], why)
        return key

    def _least_loaded(self, free: list[Key]) -> Key:
        """A free slot on the upstream with the fewest requests running, then the most slots
        holding nobody's cache."""
        load = {u: 0 for u, _ in free}
        for k, t in self._busy.items():
            if k[0] in load and not t.saving:
                load[k[0]] += 1
        cold = {u: 0 for u in load}
        for k in free:
            if k not in self._owner:
                cold[k[0]] += 1
        best = min(load, key=lambda u: (load[u], -cold[u], u))
        return self._coldest([k for k in free if k[0] == best])


    def _coldest(self, free: list[Key]) -> Key:
        """Prefer a slot holding nobody's cache, then the one whose cache is oldest."""
        cold = [k for k in free if k not in self._owner]
        if cold:
            return cold[0]
        return min(free, key=lambda k: self._last_used.get(k, 0.0))
