"""Retention runs from whichever service is up, and at once with `python -m collector compact`;
the lifetime totals it sits under never drop. Real proxy process, real CLI, real SQLite store."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from llamabridge.store import ScrapeWrite, Store
from tests.support import processes
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

DAY = 86400


def old_store(path: str) -> float:
    """A store with request rows 40, 20 and 1 days old and per-scrape samples from 3 days ago."""
    now = time.time()
    store = Store(path)
    for age, count in ((40, 5), (20, 4), (1, 3)):
        store.add_requests([{"ts": now - age * DAY + i, "route": "/v1/messages", "class": "main", "status": 200,
                             "prompt_tokens": 10, "cached_tokens": 0, "generated_tokens": 2} for i in range(count)])
    for i in range(30):
        store.scrape("test", now - 3 * DAY + 10 * i, 60, lambda base: ScrapeWrite(sample={"up": 1, "generated_tokens": 5}))
    store.close()
    return now


def counts(path: str) -> tuple[int, float, dict[int, int]]:
    """(request rows, the running request total, samples per resolution)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        total = db.execute("SELECT value FROM counters WHERE name = 'requests'").fetchone()[0]
        samples = dict(db.execute("SELECT resolution, COUNT(*) FROM samples GROUP BY resolution").fetchall())
    return rows, total, samples


def test_the_proxy_alone_applies_retention(tmp_path):
    db = str(tmp_path / "store.db")
    old_store(db)
    assert counts(db) == (12, 12, {0: 30})
    nowhere = f"http://127.0.0.1:{processes.free_port()}"  # no llama-server, no collector: the proxy alone
    with processes.proxy(nowhere, DB_PATH=db, REQUEST_LOG_DAYS="30") as proxy:
        wait_until(lambda: counts(db)[0] == 7, 30, what=lambda: f"retention from the proxy: {counts(db)} {proxy.log_text()[-2000:]}")
        _rows, total, samples = counts(db)
        assert total == 12  # the lifetime request count is a running total: it does not drop with the rows
        assert samples.get(0, 0) == 0 and samples[60] >= 1  # 3-day-old scrapes rolled up into minutes


def test_collector_compact_applies_retention_now(tmp_path):
    db = str(tmp_path / "store.db")
    old_store(db)
    env = dict(os.environ, DB_PATH=db, REQUEST_LOG_DAYS="10", SAMPLES_RAW_HOURS="24")
    done = subprocess.run([sys.executable, "-m", "collector", "compact"], cwd=processes.ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "removed 9 request-log rows older than 10 days (REQUEST_LOG_DAYS)" in done.stdout, done.stdout
    assert "rolled 30 samples" in done.stdout and "Lifetime totals are unchanged" in done.stdout
    rows, total, samples = counts(db)
    assert (rows, total) == (3, 12) and set(samples) == {60} and 5 <= samples[60] <= 6  # 300 s of scrapes, in minutes
    bad = subprocess.run([sys.executable, "-m", "collector", "compact"], cwd=processes.ROOT, capture_output=True, text=True,
                         timeout=60, env=dict(env, REQUEST_LOG_DAYS="soon"))
    assert bad.returncode == 2 and bad.stderr.strip().startswith("llamabridge collector: REQUEST_LOG_DAYS"), bad.stderr
