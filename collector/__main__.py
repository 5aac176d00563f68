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
from typing import Any

from llamabridge.serving import (
    bind_address,
    checked_in_a_child,
    serve,
    settings_or_exit,
    start_logging,
    store_or_exit,
)
from llamabridge.settings import load_env_file

# The app (Flask, APScheduler, prometheus_client), the settings and the store are imported where
# they are used: gunicorn's arbiter, which this process becomes, only supervises, and whatever it
# imports stays resident in it, counted again in the worker it forks.


def compact() -> int:
    from llamabridge.store import Store

    from .config import from_env

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
    options = checked_in_a_child(_start_check)
    load_env_file()  # the same .env for the worker, whose settings are read again there
    start_logging(options["log_level"])
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    serve(_create_app, bind=options["bind"], threads=8, timeout=60, loglevel=options["log_level"], accesslog=None,
          proc_name="llamabridge-collector")
    return 0


def _start_check() -> dict[str, Any]:
    """What start-up is refused on (checked_in_a_child), and what gunicorn needs to know."""
    from llamabridge.edge import start_problem

    from .config import from_env

    settings = settings_or_exit("collector", from_env)
    store_or_exit("collector", settings.db_path)
    if problem := start_problem(settings.edge, "COLLECTOR_HOST", settings.host):
        print(f"llamabridge collector: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return {"bind": bind_address(settings.host, settings.port), "log_level": settings.log_level}


def _create_app():
    """The app, built in gunicorn's worker (settings read again there, as the check accepted them)."""
    from .app import create_app
    from .config import from_env

    return create_app(from_env())


if __name__ == "__main__":
    sys.exit(main())
