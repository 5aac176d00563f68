"""The request log loses no row: not while another connection holds the store locked (the writer
gives up quickly, keeps its rows and tries again), and not when the proxy is stopped with SIGTERM
right after answering (the rows still waiting are written as it exits, even into a store that is
busy for a moment then). Real llama-server (tiny model), real proxy process, real SQLite store."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from tests.support import processes
from tests.support.prom import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

FAILED_WRITE = "could not write"


def stored(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]


@contextlib.contextmanager
def write_locked(db: Path):
    """Another connection's write transaction on the store, as the collector's roll-up or a
    `sqlite3` shell left open would hold it, until the block ends."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def cheap_requests(url: str, title: dict, count: int) -> None:
    """`count` requests that each get a request-log row without a generation: local title answers
    and token counts, alternately."""
    for i in range(count):
        if i % 2:
            answer = requests.post(url + "/v1/messages/count_tokens?beta=true", timeout=30,
                                   json={"model": "m", "messages": [{"role": "user", "content": f"count {i}"}]})
        else:
            answer = requests.post(url + "/v1/messages?beta=true", json=dict(title, stream=False), timeout=30,
                                   headers={"X-Claude-Code-Session-Id": f"log-{i}"})
        assert answer.status_code == 200, answer.text[:300]


LOCKED_SECONDS = 20


def test_rows_kept_while_the_store_is_locked_all_arrive_once_it_is_free(llama, capture_messages, tmp_path):
    """Locked for 20 s while requests flow: the dashboard's reads answer all along (they have a
    connection of their own, and WAL lets them read past a writer), and every row arrives after."""
    db = tmp_path / "store.db"
    with processes.proxy(llama.url, DB_PATH=str(db), LOG_LEVEL="debug") as proxy:
        sent = failures = 0
        with write_locked(db):
            locked_at = time.monotonic()
            # Requests keep coming while the writer fails, flush after flush: 10 between failures,
            # for 20 s and at least four failures.
            while failures < 4 or time.monotonic() - locked_at < LOCKED_SECONDS:
                cheap_requests(proxy.url, capture_messages[0], 10)
                sent += 10
                failures += 1
                wait_until(lambda failures=failures: proxy.log_text().count(FAILED_WRITE) >= failures, timeout=30,
                           what=f"failed write {failures}")
                for path in ("/api/totals", "/api/requests", "/api/samples"):
                    answer = requests.get(proxy.url + path, timeout=1)  # not behind the writer's 2 s waits
                    assert answer.status_code == 200, (path, answer.text[:300])
            assert stored(db) == 0
        wait_until(lambda: stored(db) == sent, timeout=30, what=lambda: f"{sent} rows (have {stored(db)})")
        assert metric(proxy.url, "llamabridge_proxy_request_log_dropped_total") == 0
        log = proxy.log_text()
        # One warning, not one per failed flush; the rest at debug level.
        assert sum(FAILED_WRITE in line and "WARNING" in line for line in log.splitlines()) == 1, log[-4000:]
        assert "the store took rows again after" in log


@pytest.mark.parametrize("busy_at_exit", [False, True], ids=["free", "busy-at-exit"])
def test_sigterm_right_after_the_last_answer_writes_every_row(llama, capture_messages, tmp_path, busy_at_exit):
    """Stopped the way Docker stops it (SIGTERM to gunicorn's arbiter, which stops the worker
    gracefully): the rows of the last half second are written on the way out. Busy at exit: every
    row is still waiting when the worker exits, and the store frees up only after that."""
    db = tmp_path / "store.db"
    count = 30
    with processes.proxy(llama.url, DB_PATH=str(db)) as proxy:
        with write_locked(db) if busy_at_exit else contextlib.nullcontext():
            cheap_requests(proxy.url, capture_messages[0], count)
            os.kill(proxy.proc.pid, signal.SIGTERM)
            if busy_at_exit:
                wait_until(lambda: "Worker exiting" in proxy.log_text(), timeout=30, what="the worker to exit")
                assert stored(db) == 0
        assert proxy.proc.wait(timeout=30) == 0, proxy.log_text()[-4000:]
    assert stored(db) == count, proxy.log_text()[-4000:]
    assert "lost" not in proxy.log_text()
