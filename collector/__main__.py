"""`python -m collector`: scrape llama-server every COLLECT_INTERVAL seconds into the SQLite store
and serve /metrics and the JSON API on COLLECTOR_PORT (gunicorn, one process with threads: the
scheduler must run exactly once)."""

from __future__ import annotations

import logging
import sys

from gunicorn.app.base import BaseApplication

from proxy.config import ConfigError

from .app import create_app
from .config import CollectorSettings, from_env


class _Server(BaseApplication):
    def __init__(self, settings: CollectorSettings):
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        for key, value in {
            "bind": f"{s.host}:{s.port}", "workers": 1, "worker_class": "gthread", "threads": 8, "timeout": 60,
            "loglevel": s.log_level, "accesslog": None, "errorlog": "-", "proc_name": "llamabridge-collector",
            "control_socket_disable": True,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)


def main() -> int:
    try:
        settings = from_env()
    except ConfigError as exc:
        print(f"llamabridge collector: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    _Server(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
