"""`python -m collector`: scrape llama-server every COLLECT_INTERVAL seconds into the SQLite store
and serve /metrics and the JSON API on COLLECTOR_PORT (gunicorn, one process with threads: the
scheduler must run exactly once)."""

from __future__ import annotations

import logging
import sys

from llamabridge.edge import start_problem
from proxy.serving import bind_address, serve, settings_or_exit, store_or_exit

from .app import create_app
from .config import from_env


def main() -> int:
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
