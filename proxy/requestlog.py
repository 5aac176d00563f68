"""The proxy's request log: one row per request in the shared SQLite store, written off the
request thread.

Request threads append a row to a list under a lock and return: no thread is woken per
request (waking the writer for every row cost a measurable share of the proxy's added
latency). One writer thread takes the whole list every half second and writes it in one
transaction, so a slow disk never slows a request, and the rows still waiting when the process
exits are written on the way out. If rows pile up past QUEUE_SIZE (the disk has stalled), new
rows are dropped and counted rather than blocking.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from collector.store import Store

log = logging.getLogger("llamabridge.requestlog")

FLUSH_SECONDS = 0.5
QUEUE_SIZE = 10_000
BATCH = 500


class RequestLog:
    def __init__(self, db_path: str):
        self.store = Store(db_path)
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._write_forever, name="request-log", daemon=True)
        self._thread.start()
        # The last half second of requests would die with the writer thread (Ctrl-C ends the
        # worker at once): written on the way out.
        atexit.register(self.flush)

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            if len(self._rows) >= QUEUE_SIZE:
                self.dropped += 1
                return
            self._rows.append(row)

    def flush(self) -> None:
        """Write the rows waiting now: every FLUSH_SECONDS, and once more as the process exits."""
        with self._lock:
            rows, self._rows = self._rows, []
        for i in range(0, len(rows), BATCH):
            try:
                self.store.add_requests(rows[i:i + BATCH])
            except Exception:  # noqa: BLE001 - the log must never take the proxy down
                log.exception("could not write %d request-log rows", len(rows[i:i + BATCH]))

    def _write_forever(self) -> None:
        stop = threading.Event()  # never set: the thread is a daemon and ends with the process
        while not stop.wait(FLUSH_SECONDS):
            self.flush()
