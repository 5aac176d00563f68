"""The proxy's request log: one row per request in the shared SQLite store, written off the
request thread, and no row lost to a store that is busy for a while. The proxy writes it; the
collector's dashboard API reads it (llamabridge/api.py).

Request threads append a row to a list under a lock and return: no thread is woken per
request (waking a thread per row is a share of the proxy's added latency). One writer thread writes the list, oldest first, in transactions of up to BATCH rows
every half second, so a slow disk never slows a request.

The list is also the retry buffer. A batch is taken off it only once written: when the store
cannot take it (another connection holds it locked past the writer's short busy timeout, or
the disk is full), the batch stays at the front and is tried again at the next flush. The
list is bounded: past QUEUE_SIZE rows, the newest are dropped, counted
(`llamabridge_proxy_request_log_dropped_total`) and logged at most once a minute. The newest,
not the oldest: what is kept is then every row up to the moment the store stopped, in order,
with one gap at the end that the counter and the log name; and dropping never touches the rows
at the front, which the writer may be writing at that moment.

Retention (REQUEST_LOG_DAYS and the samples' windows) is applied hourly from this thread too,
as the collector does: a proxy run without a collector does not grow the log forever.

The rows still waiting when the process exits (gunicorn's graceful stop on SIGTERM ends the
worker with sys.exit, which runs atexit handlers once its request threads are done) are
written on the way out, retried for a few seconds if the store is busy.
"""

from __future__ import annotations

import atexit
import logging
import sqlite3
import threading
import time
from typing import Any

from .store import Retention, Store

log = logging.getLogger("llamabridge.requestlog")

FLUSH_SECONDS = 0.5
QUEUE_SIZE = 10_000
BATCH = 500
# The store's own busy timeout (30 s) would hold the writer that long behind another
# connection's transaction; a short one lets it give up and try again at a later flush,
# keeping its rows meanwhile.
WRITE_BUSY_SECONDS = 2.0
# At exit, how long to keep trying a busy store (each try waits up to WRITE_BUSY_SECONDS): well
# within gunicorn's graceful timeout (10 s), which also has to cover the requests still running.
EXIT_SECONDS = 4.0
# At most one warning per this many seconds about failed writes or dropped rows.
LOG_EVERY_SECONDS = 60.0
# How often retention runs (as the collector's job), and how soon it is retried after a failure.
COMPACT_SECONDS = 3600.0
COMPACT_RETRY_SECONDS = 60.0


class RequestLog:
    def __init__(self, db_path: str, retention: Retention | None = None):
        self.store = Store(db_path)
        self.retention = retention or Retention()
        self._next_compaction = time.monotonic()
        with self.store.lock:
            self.store.db.execute(f"PRAGMA busy_timeout={int(WRITE_BUSY_SECONDS * 1000)}")
        self._rows: list[dict[str, Any]] = []  # oldest first; a batch leaves only once written
        self._lock = threading.Lock()  # guards _rows and dropped
        self._writing = threading.Lock()  # one writer at a time: the thread, or the flush at exit
        self.dropped = 0
        self._failures = 0  # failed writes since the last one that succeeded
        self._dropped_logged = 0
        self._last_warning = {"write": float("-inf"), "refused": float("-inf"), "drop": float("-inf"), "compact": float("-inf")}
        self._thread = threading.Thread(target=self._write_forever, name="request-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            if len(self._rows) >= QUEUE_SIZE:
                self.dropped += 1
                return
            self._rows.append(row)

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self) -> bool:
        """Write every row waiting now, oldest first; False if the store could not take a batch
        now (it is kept, with everything after it, for the next flush)."""
        with self._writing:
            try:
                while batch := self._next_batch():
                    if not self._write(batch):
                        return False
                return True
            finally:
                self._log_drops()

    def close(self) -> None:
        """The last flush, as the process exits: retried while the store is busy, for a while."""
        deadline = time.monotonic() + EXIT_SECONDS
        while not self.flush():
            if time.monotonic() > deadline:
                with self._writing, self._lock:
                    lost = len(self._rows)
                    self.dropped += lost
                    self._rows.clear()
                log.error("exiting with %d request-log rows the store would not take in %.0fs; they are lost", lost, EXIT_SECONDS)
                return
            time.sleep(FLUSH_SECONDS)  # the other connection's transaction has no event to wait on

    def _next_batch(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._rows[:BATCH]

    def _write(self, batch: list[dict[str, Any]]) -> bool:
        """Write a batch from the front of the list and take it off; False if the store could not
        take (all of) it now: what is left stays at the front."""
        try:
            self.store.add_requests(batch)
            done = len(batch)
        except sqlite3.OperationalError as exc:
            done = self._failed(batch, exc)
        except Exception as exc:  # noqa: BLE001 - the log must never take the proxy down
            # A row the store refuses whatever the moment: retrying it would hold back every row
            # behind it. Written one by one, only the refused ones are dropped.
            self._warn("refused", "the store refused a batch of %d request-log rows (%r); writing them one by one",
                       len(batch), exc)
            done = self._write_one_by_one(batch)
        if done == len(batch) and self._failures:
            log.info("request log: the store took rows again after %d failed writes", self._failures)
            self._failures = 0
        with self._lock:
            del self._rows[:done]
        return done == len(batch)

    def _failed(self, batch: list[dict[str, Any]], exc: sqlite3.OperationalError) -> int:
        # Locked, busy, disk full, an I/O error: the store may take the same rows later.
        self._failures += 1
        self._warn("write", "could not write %d request-log rows (%s); keeping %d rows and retrying every %.1fs",
                   len(batch), exc, self.pending(), FLUSH_SECONDS)
        return 0

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> int:
        """Rows written or dropped, from the front, until the store is busy (that row and the
        rest are kept)."""
        for done, row in enumerate(batch):
            try:
                self.store.add_requests([row])
            except sqlite3.OperationalError as exc:
                return done + self._failed(batch[done:], exc)
            except Exception:  # noqa: BLE001
                with self._lock:
                    self.dropped += 1
        return len(batch)

    def _log_drops(self) -> None:
        with self._lock:
            dropped = self.dropped
        if dropped > self._dropped_logged and self._warn(
                "drop", "dropped %d request-log rows (%d since start): the store refused them, or %d were already "
                "waiting for it (QUEUE_SIZE)", dropped - self._dropped_logged, dropped, QUEUE_SIZE):
            self._dropped_logged = dropped

    def _warn(self, kind: str, message: str, *args: Any) -> bool:
        """Log a warning unless one of this kind was logged less than LOG_EVERY_SECONDS ago (then
        at debug level: a store locked for minutes is one line a minute, not two a second)."""
        now = time.monotonic()
        if now - self._last_warning[kind] < LOG_EVERY_SECONDS:
            log.debug(message, *args)
            return False
        self._last_warning[kind] = now
        log.warning(message, *args)
        return True

    def _write_forever(self) -> None:
        stop = threading.Event()  # never set: the thread is a daemon and ends with the process
        while not stop.wait(FLUSH_SECONDS):
            self.flush()
            if time.monotonic() >= self._next_compaction:
                self.compact()

    def compact(self) -> None:
        """Apply retention now (the next run an hour later, or a minute later if the store was busy)."""
        try:
            self.store.compact(time.time(), self.retention)
        except sqlite3.Error as exc:
            self._warn("compact", "could not apply retention to the store (%s); retrying in %.0fs", exc, COMPACT_RETRY_SECONDS)
            self._next_compaction = time.monotonic() + COMPACT_RETRY_SECONDS
            return
        self._next_compaction = time.monotonic() + COMPACT_SECONDS
