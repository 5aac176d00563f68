"""`python -m collector`: scrape llama-server every COLLECT_INTERVAL seconds into the SQLite store
and serve /metrics and the JSON API on COLLECTOR_PORT (gunicorn, one process with threads: the
scheduler must run exactly once).

`python -m collector compact` applies the retention settings (REQUEST_LOG_DAYS,
SAMPLES_RAW_HOURS, SAMPLES_MINUTE_DAYS) to the store now, rather than at the next hourly run, and
says what it removed. Lifetime totals are running totals and do not change.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from llamabridge.edge import start_problem
from proxy.serving import bind_address, serve, settings_or_exit, store_or_exit

from .app import create_app
from .config import from_env
from .store import Store


def compact() -> int:
    settings = settings_or_exit("collector", from_env)
    store_or_exit("collector", settings.db_path)
    store = Store(settings.db_path)
    try:
        removed = store.compact(time.time(), settings.retention)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # give the space back to the file system now
    finally:
        store.close()
    r = settings.retention
    print(f"{settings.db_path}: removed {removed['requests']} request-log rows older than {r.requests_days:g} days "
          f"(REQUEST_LOG_DAYS); rolled {removed['samples_to_minutes']} samples older than {r.raw_hours:g} h into "
          f"per-minute rows (SAMPLES_RAW_HOURS) and {removed['minutes_to_hours']} per-minute rows older than "
          f"{r.minute_days:g} days into per-hour rows (SAMPLES_MINUTE_DAYS). Lifetime totals are unchanged.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector", description="llamabridge's lifetime-metrics collector")
    parser.add_argument("command", nargs="?", choices=("serve", "compact"), default="serve",
                        help="serve (the default) or compact: apply the retention settings to the store now")
    if parser.parse_args(argv).command == "compact":
        return compact()
    settings = settings_or_exit("collector", from_env)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    store_or_exit("collector", settings.db_path)
    if problem := start_problem(settings.edge, "COLLECTOR_HOST", settings.host):
        print(f"llamabridge collector: {problem}", file=sys.stderr)
        return 2
    serve(lambda: create_app(settings), bind=bind_address(settings.host, settings.port), threads=8, timeout=60,
          loglevel=settings.log_level, accesslog=None, proc_name="llamabridge-collector")
    return 0


if __name__ == "__main__":
    sys.exit(main())
