"""The admission gate on its own: slots, priority then arrival order, bounds, affinity, cancels."""

from __future__ import annotations

import threading

import pytest

from proxy.gate import Gate, QueueFull, QueueTimeout


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


def test_queue_full_is_overloaded():
    gate = Gate(slots=1, queue_max=2, queue_timeout=60)
    gate.enqueue("main", 0, None)
    gate.enqueue("main", 0, None)
    gate.enqueue("main", 0, None)
    with pytest.raises(QueueFull) as err:
        gate.enqueue("main", 0, None)
    assert err.value.status == 529 and err.value.retry_after


def test_wait_times_out_and_leaves_the_queue():
    gate = Gate(slots=1, queue_max=5, queue_timeout=0.2)
    gate.enqueue("main", 0, None)
    waiter = gate.enqueue("main", 0, None)
    with pytest.raises(QueueTimeout):
        while gate.wait(waiter, 0.05) is None:
            pass
    assert gate.depth() == 0


def test_admit_blocks_until_release_and_check_can_abort():
    gate = Gate(slots=1, queue_max=5, queue_timeout=60)
    first = gate.admit("main", 0, None)
    got = []
    worker = threading.Thread(target=lambda: got.append(gate.admit("main", 0, None, step=0.01)))
    worker.start()
    gate.release(first)
    worker.join(5)
    assert got and got[0].slot == 0

    class Gone(Exception):
        pass

    with pytest.raises(Gone):
        gate.admit("main", 0, None, check=lambda: (_ for _ in ()).throw(Gone()), step=0.01)
    assert gate.depth() == 0


def test_cancel_after_grant_gives_the_slot_back():
    gate = Gate(slots=1, queue_max=5, queue_timeout=60)
    first = gate.enqueue("main", 0, None)
    second = gate.enqueue("main", 0, None)
    gate.cancel(first)
    assert second.ticket is not None and gate.in_flight() == 1


def test_sessions_return_to_their_slot_and_cold_slots_are_preferred():
    gate = Gate(slots=3, queue_max=5, queue_timeout=60)
    a = gate.admit("main", 0, "session-a")
    b = gate.admit("main", 0, "session-b")
    assert a.slot != b.slot
    gate.release(a)
    gate.release(b)
    assert gate.has_cold_free_slot()
    anon = gate.admit("background", 2, None)
    assert anon.slot not in (a.slot, b.slot)  # the slot holding nobody's cache
    assert not gate.has_cold_free_slot()
    again = gate.admit("main", 0, "session-b")
    assert again.slot == b.slot
