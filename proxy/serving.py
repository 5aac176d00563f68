"""Run a Flask app under gunicorn as one process with threads (the proxy and the collector both).

One process, never several: the proxy's admission gate and session state, and the collector's
scheduler, must each exist exactly once.
"""

from __future__ import annotations

from typing import Any, Callable

from gunicorn.app.base import BaseApplication


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server(BaseApplication):
    def __init__(self, load: Callable[[], Any], options: dict[str, Any]):
        self._load = load
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        options = {
            "workers": 1,
            "worker_class": "gthread",
            "errorlog": "-",
            # gunicorn 23+'s control socket has one fixed path per user: two of our services (or a
            # service and a test run) would fight over it, and we do not use it.
            "control_socket_disable": True,
            **self._options,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._load()


def serve(load: Callable[[], Any], **options: Any) -> None:
    """Serve the app `load()` builds (called in the worker) with these gunicorn settings."""
    _Server(load, options).run()
