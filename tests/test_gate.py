"""The admission gate on its own: slots, priority then arrival order, bounds, affinity, cancels;
and a state machine (hypothesis) that checks those promises after every step of random sequences."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.gate import Gate, QueueFull, QueueTimeout, Threads, Waiter


def test_grants_up_to_the_slot_count_then_queues():
    gate = Gate(slots=2, queue_max=10, queue_timeout=60)
    a, b, c = (gate.enqueue("main", 0, None) for _ in range(3))
    assert a.ticket and b.ticket and c.ticket is None
    assert {a.ticket.slot, b.ticket.slot} == {0, 1}
    assert gate.depth() == 1 and gate.in_flight() == 2
    gate.release(a.ticket)
    assert c.ticket is not None and c.ticket.slot == a.ticket.slot


def test_priority_then_arrival_order():
    gate = Gate(slots=1, queue_max=10, queue_timeout=60)
    running = gate.enqueue("main", 0, None)
    queued = [gate.enqueue(*spec, None) for spec in [("background", 2), ("subagent", 1), ("main", 0), ("title", 2), ("main", 0)]]
    served = []
    ticket = running.ticket
    for _ in queued:
        gate.release(ticket)
        granted = [w for w in queued if w.ticket is not None and w not in served]
        assert len(granted) == 1
        served.append(granted[0])
        ticket = granted[0].ticket
    assert [(w.klass, w.seq) for w in served] == sorted([(w.klass, w.seq) for w in queued],
                                                        key=lambda kw: ({"main": 0, "subagent": 1}.get(kw[0], 2), kw[1]))


def test_users_take_turns_within_a_class_and_classes_still_come_first():
    gate = Gate(slots=1, queue_max=20, queue_timeout=60)
    ticket = gate.enqueue("main", 0, None, "ann").ticket
    queued = [gate.enqueue("subagent", 1, None, "ann") for _ in range(5)]
    queued += [gate.enqueue("subagent", 1, None, "ben"), gate.enqueue("main", 0, None, "ann"), gate.enqueue("subagent", 1, None, "cal")]
    served = []
    for _ in queued:
        gate.release(ticket)
        (granted,) = [w for w in queued if w.ticket is not None and w not in served]
        served.append(granted)
        ticket = granted.ticket
    # ann's main turn first (its class), then cal and ben, who had no turn yet, then ann's subagents.
    assert [(w.klass, w.user) for w in served] == [("main", "ann"), ("subagent", "ben"), ("subagent", "cal")] + [("subagent", "ann")] * 5


def test_queue_full_is_overloaded():
    gate = Gate(slots=1, queue_max=2, queue_timeout=60)
    gate.enqueue("main", 0, None)
    gate.enqueue("main", 0, None)
    gate.enqueue("main", 0, None)
    with pytest.raises(QueueFull) as err:
        gate.enqueue("main", 0, None)
    assert err.value.status == 529 and err.value.retry_after


def test_gates_never_hold_more_requests_than_their_threads():
    """Waiting and generating requests each hold a server thread: the gates of one process stop at
    their shared budget, even below QUEUE_MAX (llama-server reported more slots than assumed),
    and every way of leaving gives the thread back, once."""
    threads = Threads(4)
    main = Gate(slots=3, queue_max=10, queue_timeout=60, threads=threads)
    background = Gate(slots=1, queue_max=10, queue_timeout=0.1, threads=threads)
    running = [main.enqueue("main", 0, None) for _ in range(3)] + [background.enqueue("background", 2, None)]
    assert all(w.ticket for w in running) and threads.held == 4
    for gate in (main, background):
        with pytest.raises(QueueFull) as err:
            gate.enqueue("main", 0, None)
        assert err.value.status == 529 and err.value.retry_after and "PROXY_THREADS" in err.value.message
    main.release(running[0].ticket)
    main.release(running[0].ticket)  # twice: harmless
    again = main.enqueue("main", 0, None)  # the freed slot, at once
    assert again.ticket is not None and threads.held == 4
    main.cancel(running[1])  # leaving with a slot
    assert threads.held == 3
    queued = background.enqueue("background", 2, None)  # behind the background slot
    assert queued.ticket is None and threads.held == 4
    background.cancel(queued)  # leaving the queue
    background.cancel(queued)
    assert threads.held == 3
    timing_out = background.enqueue("background", 2, None)
    with pytest.raises(QueueTimeout):
        while background.wait(timing_out, 0.01) is None:
            pass
    background.cancel(timing_out)  # dropped at the timeout, then cancelled on the request's way out
    assert threads.held == 3


def test_wait_times_out_and_leaves_the_queue():
    gate = Gate(slots=1, queue_max=5, queue_timeout=0.2)
    gate.enqueue("main", 0, None)
    waiter = gate.enqueue("main", 0, None)
    with pytest.raises(QueueTimeout):
        while gate.wait(waiter, 0.05) is None:
            pass
    assert gate.depth() == 0


def test_wait_blocks_until_release_and_a_waiter_that_leaves_is_gone():
    gate = Gate(slots=1, queue_max=5, queue_timeout=60)
    first = gate.enqueue("main", 0, None).ticket
    waiter = gate.enqueue("main", 0, None)
    got = []
    worker = threading.Thread(target=lambda: got.append(gate.wait(waiter, 30)))
    worker.start()
    gate.release(first)
    worker.join(5)
    assert got and got[0].slot == 0

    leaver = gate.enqueue("main", 0, None)
    assert gate.wait(leaver, 0.01) is None  # still queued: the request checks its client, which has gone
    gate.cancel(leaver)
    assert gate.depth() == 0


def test_cancel_after_grant_gives_the_slot_back():
    gate = Gate(slots=1, queue_max=5, queue_timeout=60)
    first = gate.enqueue("main", 0, None)
    second = gate.enqueue("main", 0, None)
    gate.cancel(first)
    assert second.ticket is not None and gate.in_flight() == 1


def test_sessions_return_to_their_slot_and_cold_slots_are_preferred():
    gate = Gate(slots=3, queue_max=5, queue_timeout=60)
    a = gate.enqueue("main", 0, "session-a").ticket
    b = gate.enqueue("main", 0, "session-b").ticket
    assert a.slot != b.slot
    gate.release(a)
    gate.release(b)
    assert gate.has_cold_free_slot()
    anon = gate.enqueue("background", 2, None).ticket
    assert anon.slot not in (a.slot, b.slot)  # the slot holding nobody's cache
    assert not gate.has_cold_free_slot()
    again = gate.enqueue("main", 0, "session-b").ticket
    assert again.slot == b.slot


def slot_of(w: Waiter) -> int:
    """The slot the gate granted a waiter the model holds as granted."""
    assert w.ticket is not None, f"waiter {w.seq} has no ticket"
    return w.ticket.slot


class GateModel(RuleBasedStateMachine):
    """Random sequences of what request threads do to the gate (join, leave, finish, and
    llama-server restarting with another slot count), checked after every step against what
    the gate promises: one generation per slot, no slot idle while someone waits, the queue
    served by priority, then users in turn (the one served longest ago first), then arrival, a
    session back on the slot that holds its cache, and never more requests held (waiting or
    generating) than its thread budget, which a third slot lets them reach before QUEUE_MAX."""

    def __init__(self):
        super().__init__()
        self.gate = Gate(slots=2, queue_max=4, queue_timeout=3600, threads=Threads(6))
        self.waiting: list[Waiter] = []  # in the gate's queue, by our own account
        self.running: list[Waiter] = []
        self.owner: dict[int, str] = {}  # slot -> session whose cache it holds, by our own account
        self.asked: dict[int, int] = {}  # waiter.seq -> the priority it joined with
        self.turn: dict[str | None, int] = {}  # user -> when they were last granted a slot, by our own count
        self.grants = 0

    def _granted_since(self, before: list[Waiter]) -> None:
        """Move what the gate granted to `running`, checking it took the head of the queue each time."""
        granted = [w for w in self.waiting if w.ticket is not None]
        pool, expected = list(before), []
        for _ in granted:
            head = min(pool, key=lambda w: (self.asked[w.seq], self.turn.get(w.user, -1), w.seq))
            pool.remove(head)
            expected.append(head)
            self.grants += 1
            self.turn[head.user] = self.grants
        assert sorted(granted, key=lambda w: w.seq) == sorted(expected, key=lambda w: w.seq), "the queue was not served in order"
        for w in expected:
            mine = [s for s, o in self.owner.items() if o == w.session and not self._busy(s, w)]
            if w.session is not None and mine and mine[0] < self.gate.slots:
                assert slot_of(w) == mine[0], "a session did not get the slot holding its cache"
            if w.session is not None:
                self.owner = {s: o for s, o in self.owner.items() if o != w.session}
                self.owner[slot_of(w)] = w.session
            self.waiting.remove(w)
            self.running.append(w)

    def _busy(self, slot: int, other_than: Waiter) -> bool:
        return any(slot_of(r) == slot for r in self.running if r is not other_than)

    @rule(priority=st.sampled_from([0, 1, 2]), session=st.sampled_from([None, "a", "b", "c"]),
          user=st.sampled_from([None, "ann", "ben"]))
    def join(self, priority: int, session: str | None, user: str | None) -> None:
        free = self.gate.slots - len(self.running)
        if (len(self.waiting) >= self.gate.queue_max and free <= len(self.waiting)
                or len(self.waiting) + len(self.running) >= self.gate.threads.limit):
            with pytest.raises(QueueFull):
                self.gate.enqueue("x", priority, session, user)
            return
        before = list(self.waiting)
        waiter = self.gate.enqueue("x", priority, session, user)
        self.asked[waiter.seq] = priority
        self.waiting.append(waiter)
        self._granted_since(before + [waiter])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data) -> None:
        done = data.draw(st.sampled_from(self.running))
        self.running.remove(done)
        before = list(self.waiting)
        self.gate.release(done.ticket)
        self.gate.release(done.ticket)  # twice: harmless
        self._granted_since(before)

    @precondition(lambda self: self.waiting or self.running)
    @rule(data=st.data())
    def leave(self, data) -> None:
        gone = data.draw(st.sampled_from(self.waiting + self.running))
        (self.waiting if gone in self.waiting else self.running).remove(gone)
        before = list(self.waiting)
        self.gate.cancel(gone)
        self._granted_since(before)

    @rule(slots=st.integers(1, 3))
    def restart_with(self, slots: int) -> None:
        before = list(self.waiting)
        self.gate.resize(slots)
        self.owner = {s: o for s, o in self.owner.items() if s < slots}
        self._granted_since(before)

    @invariant()
    def one_generation_per_slot_and_none_idle_while_someone_waits(self) -> None:
        slots = [slot_of(w) for w in self.running]
        assert len(slots) == len(set(slots)), slots
        assert self.gate.in_flight() == len(self.running) and self.gate.depth() == len(self.waiting)
        assert self.gate.threads.held == len(self.running) + len(self.waiting), "a thread not given back, or given twice"
        if self.waiting:
            assert all(s in slots for s in range(self.gate.slots)), "a slot is idle while requests wait"
        for w in self.waiting:
            assert w.ticket is None and self.gate.wait(w, 0) is None


GateModel.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
test_the_gate_keeps_its_promises_under_any_sequence = GateModel.TestCase


def test_a_slot_is_held_for_saving_only_while_nobody_waits_and_its_session_waits_for_it():
    threads = Threads(10)
    gate = Gate(slots=2, queue_max=10, queue_timeout=60, threads=threads)
    a = gate.enqueue("main", 0, "A")
    slot = a.ticket.slot
    assert gate.hold(slot, "A") is None  # busy
    gate.release(a.ticket)
    assert gate.hold(slot, "B") is None  # not B's cache
    held = gate.hold(slot, "A")
    assert held is not None and held.saving and threads.held == 0 and gate.in_flight() == 0
    # A's next turn waits for its slot rather than go to the free one; B takes the free one.
    a2 = gate.enqueue("main", 0, "A")
    assert a2.ticket is None and gate.depth() == 1
    assert gate.hold(1 - slot, "A") is None  # someone waits: no save now
    gate.release(held)
    assert a2.ticket is not None and a2.ticket.slot == slot and a2.ticket.previous == "A"
    b = gate.enqueue("main", 0, "B")
    assert b.ticket is not None and b.ticket.slot == 1 - slot
    gate.release(b.ticket)
    gate.release(a2.ticket)
    assert threads.held == 0
    # Another request used the slot since: A's cache is gone from it, nothing to save.
    c = gate.enqueue("background", 2, None)
    assert c.ticket is not None
    gate.release(c.ticket)
    assert gate.hold(c.ticket.slot, "A" if c.ticket.slot == slot else "B") is None


def test_forgotten_slots_hold_nobodys_cache():
    gate = Gate(slots=2, queue_max=10, queue_timeout=60)
    a = gate.enqueue("main", 0, "A")
    gate.release(a.ticket)
    assert gate.last_user(a.ticket.slot) == "A"
    gate.forget({a.ticket.slot})
    assert gate.last_user(a.ticket.slot) is None
    again = gate.enqueue("main", 0, "A")
    assert again.ticket is not None and again.ticket.previous is None


def test_sessions_stay_on_their_upstream_and_new_ones_go_to_the_least_loaded():
    gate = Gate(slots=[1, 1], queue_max=10, queue_timeout=60)
    a = gate.enqueue("main", 0, "A")
    b = gate.enqueue("main", 0, "B")
    assert {a.ticket.upstream, b.ticket.upstream} == {0, 1}  # spread: the other upstream had nothing running
    gate.release(a.ticket)
    gate.release(b.ticket)
    for _ in range(3):  # back to the upstream holding their cache, turn after turn
        again_b, again_a = gate.enqueue("main", 0, "B"), gate.enqueue("main", 0, "A")
        assert again_a.ticket.upstream == a.ticket.upstream and again_b.ticket.upstream == b.ticket.upstream
        gate.release(again_a.ticket)
        gate.release(again_b.ticket)


def test_a_session_waits_for_its_upstream_then_moves_after_the_affinity_bound():
    moves = []
    gate = Gate(slots=[1, 1], queue_max=10, queue_timeout=60, affinity_wait=0.3, on_move=lambda *m: moves.append(m))
    a = gate.enqueue("main", 0, "A")
    gate.release(a.ticket)
    home = a.ticket.upstream
    busy = gate.enqueue("main", 0, "X")  # a new session takes the other upstream ...
    other = gate.enqueue("main", 0, "Y")  # ... and another A's, so A's upstream is busy
    assert {busy.ticket.upstream, other.ticket.upstream} == {0, 1}
    gate.release(busy.ticket if busy.ticket.upstream != home else other.ticket)  # the other upstream frees up
    a2 = gate.enqueue("main", 0, "A")
    assert a2.ticket is None  # waits for its own upstream rather than lose its cache
    ticket = gate.wait(a2, 5)  # until the bound, then anywhere
    assert ticket is not None and ticket.upstream != home and ticket.waited >= 0.3
    assert moves == [("A", home, ticket.upstream, f"waited 0.3s (AFFINITY_MAX_WAIT) for upstream {home}")]


def test_a_down_upstream_leaves_the_rotation_and_its_sessions_move_at_once():
    moves = []
    gate = Gate(slots=[2, 2], queue_max=10, queue_timeout=60, affinity_wait=3600, on_move=lambda *m: moves.append(m))
    a = gate.enqueue("main", 0, "A")
    gate.release(a.ticket)
    gate.set_up(a.ticket.upstream, False)
    again = gate.enqueue("main", 0, "A")
    assert again.ticket is not None and again.ticket.upstream != a.ticket.upstream
    assert [m[3] for m in moves] == [f"upstream {a.ticket.upstream} is down"]
    gate.release(again.ticket)
    news = [gate.enqueue("main", 0, f"N{i}") for i in range(2)]
    assert all(w.ticket.upstream == again.ticket.upstream for w in news)  # none to the down one
    third = gate.enqueue("main", 0, "Z")
    assert third.ticket is None  # the up upstream is full: wait, not the down one
    gate.set_up(a.ticket.upstream, True)  # back: the waiting request goes there
    assert third.ticket is not None and third.ticket.upstream == a.ticket.upstream


def test_with_every_upstream_down_requests_go_ahead_and_fail_as_with_one():
    gate = Gate(slots=[1, 1], queue_max=10, queue_timeout=60)
    gate.set_up(0, False)
    gate.set_up(1, False)
    w = gate.enqueue("main", 0, None)
    assert w.ticket is not None
