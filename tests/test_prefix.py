"""Finding turns that re-prefilled more than the session's previous turn explains."""

from __future__ import annotations

from array import array

from proxy.prefix import PrefixTracker, common_prefix


def toks(*runs) -> array:
    out = array("i")
    for start, n in runs:
        out.extend(range(start, start + n))
    return out


def test_common_prefix():
    assert common_prefix(toks((0, 100)), toks((0, 100), (500, 5))) == 100
    assert common_prefix(toks((0, 50), (9000, 50)), toks((0, 100))) == 50
    assert common_prefix(array("i"), toks((0, 3))) == 0


def test_growing_conversation_with_full_cache_is_fine():
    tracker = PrefixTracker()
    assert tracker.observe("s", toks((0, 1000)), 0, 0, False) is None
    assert tracker.observe("s", toks((0, 1000), (5000, 200)), 0, 999, False) is None


def test_prompt_changed_early_is_reported_with_the_position():
    tracker = PrefixTracker()
    tracker.observe("s", toks((0, 1000)), 0, 0, False)
    finding = tracker.observe("s", toks((0, 300), (7000, 900)), 0, 300, False)
    assert finding.first_difference == 300 and finding.expected == 1000 and finding.reprefilled == 700
    assert "changed at token 300" in finding.reason


def test_evicted_slot_and_moved_session_are_told_apart():
    tracker = PrefixTracker()
    tracker.observe("s", toks((0, 1000)), 0, 0, False)
    assert "used by another request" in tracker.observe("s", toks((0, 1100)), 0, 5, True).reason
    assert "moved from slot 0 to slot 1" in tracker.observe("s", toks((0, 1200)), 1, 0, False).reason


def test_sessions_are_separate_and_bounded():
    tracker = PrefixTracker(max_sessions=2)
    tracker.observe("a", toks((0, 100)), 0, 0, False)
    tracker.observe("b", toks((0, 100)), 0, 0, False)
    tracker.observe("c", toks((0, 100)), 0, 0, False)
    assert tracker.observe("a", toks((0, 200)), 0, 0, False) is None  # "a" was forgotten: no history
