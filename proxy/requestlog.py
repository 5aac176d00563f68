"""The proxy's request log: one row per request in the shared SQLite store, written off the
request thread.

Request threads only put a row on a bounded queue; one writer thread drains it in batches
(a transaction every half second at most), so a slow disk never slows a request. If the queue
is ever full, rows are dropped and counted rather than blocking.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from collector.store import Store

log = logging.getLogger("llamabridge.requestlog")

FLUSH_SECONDS = 0.5
QUEUE_SIZE = 10_000


class RequestLog:
    def __init__(self, db_path: str):
        self.store = Store(db_path)
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write_forever, name="request-log", daemon=True)
        self._thread.start()

    def add(self, row: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + FLUSH_SECONDS
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self.store.add_requests(batch)
            except Exception:  # noqa: BLE001 - the log must never take the proxy down
                log.exception("could not write %d request-log rows", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
