"""Token counting: identical counts asked at the same time go to llama-server once.

The upstream here is a stand-in object, not a server: the test needs every request to be inside
the counter while the first one is still waiting for llama-server, which the real server (it
answers /apply-template in about a millisecond) cannot be made to hold on cue. What the counts
are is tested against the real llama-server in test_context_and_cache.py.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

from proxy.errors import ApiError
from proxy.tokens import TokenCounter
from proxy.upstream import ServerInfo
from tests.support.waiting import wait_until

RENDER = {"messages": [{"role": "user", "content": "foo"}], "tools": [{"type": "function", "function": {"name": "Bash"}}]}


class HeldUpstream:
    """Answers /apply-template and /tokenize like llama-server, holding each render until `release`."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.release = threading.Event()
        self.fail = fail
        self._lock = threading.Lock()

    def info(self) -> ServerInfo:
        return ServerInfo(model="m", n_ctx=4096, total_slots=1, vision=False)

    def json(self, method: str, path: str, body=None, timeout: float | None = None):
        with self._lock:
            self.calls[path] += 1
        if path == "/apply-template":
            assert self.release.wait(30)
            if self.fail:
                raise ApiError(529, "llama-server is down")
            return {"prompt": "<s>foo"}
        return {"tokens": [1, 2, 3]}


def waiting(thread: threading.Thread) -> bool:
    """Whether the thread is blocked in a wait (for llama-server, or for another thread's count)."""
    if thread.ident is None:  # not started
        return False
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "wait":
            return True
        frame = frame.f_back
    return False


def ask_together(counter: TokenCounter, upstream: HeldUpstream, n: int) -> list:
    results: list = []

    def ask() -> None:
        try:
            results.append(counter.count(RENDER))
        except ApiError as exc:
            results.append(exc.status)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for thread in threads:
        thread.start()
    # Every thread is inside count() and blocked before llama-server answers anyone.
    wait_until(lambda: all(waiting(t) for t in threads), timeout=10, what="all requests to be waiting")
    upstream.release.set()
    for thread in threads:
        thread.join(30)
    return results


def test_identical_counts_at_the_same_time_ask_llama_server_once():
    upstream = HeldUpstream()
    counter = TokenCounter(upstream)
    assert ask_together(counter, upstream, 20) == [(3, True)] * 20
    assert upstream.calls == {"/apply-template": 1, "/tokenize": 1}
    assert counter.count(RENDER) == (3, True) and upstream.calls["/tokenize"] == 1  # and then from the cache


def test_when_the_first_count_fails_the_others_try_in_their_own_right():
    upstream = HeldUpstream(fail=True)
    counter = TokenCounter(upstream)
    assert ask_together(counter, upstream, 5) == [529] * 5
    assert not counter._pending  # nothing left behind for the next request to wait on
    upstream.fail = False
    assert counter.count(RENDER) == (3, True)

