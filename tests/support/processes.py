"""Start real services as child processes on ports the OS picks, and stop them again.

Modelled on llama.cpp's own server tests: start the real binary, wait for its "listening" log
line and its health endpoint, fail at once (with the log) if it dies, terminate then kill on
teardown. Each process logs to a file the failing test can show.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import psutil
import requests

ROOT = Path(__file__).resolve().parents[2]


class ServiceDied(RuntimeError):
    pass


class Service:
    """A child process whose log announces the port it listens on."""

    def __init__(self, name: str, cmd: Sequence[str], ready: str, env: dict[str, str] | None = None,
                 health_path: str | None = None, timeout: float = 60.0, cwd: Path | None = None, health_method: str = "GET"):
        self.name = name
        self.cmd = list(cmd)
        self.ready = re.compile(ready)
        self.env = env
        self.health_path = health_path
        self.health_method = health_method
        self.timeout = timeout
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        # The service writes here for as long as it runs and the test reads it by path: no `with` fits.
        self._log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> Self:
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        while self.port is None:
            self._check_alive()
            found = self.ready.search(self.log_text())
            if found:
                self.port = int(found.group("port"))
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceDied(f"{self.name} did not report its port within {self.timeout}s:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)
        if self.health_path:
            self.wait_healthy(deadline)
        return self

    def wait_healthy(self, deadline: float | None = None) -> None:
        assert self.health_path is not None, f"{self.name} was given no health_path to poll"
        deadline = deadline or time.monotonic() + self.timeout
        while True:
            self._check_alive()
            try:
                if requests.request(self.health_method, self.url + self.health_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServiceDied(f"{self.name} never became healthy:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def connections_to(self, url: str) -> list:
        """Its open TCP connections (its children's too: gunicorn's worker) to a URL's port."""
        assert self.proc is not None
        port = int(url.rsplit(":", 1)[1])
        parent = psutil.Process(self.proc.pid)
        return [c for p in (parent, *parent.children(recursive=True)) for c in p.net_connections(kind="tcp")
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServiceDied(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    """A port nothing listens on now, for a server that must come back on the same address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(binary: str, model: str, *, ctx: int = 32768, parallel: int = 1, port: int = 0,
                 extra: Sequence[str] = ()) -> Service:
    cmd = [
        binary, "-m", model, "-t", "1", "--host", "127.0.0.1", "--port", str(port),
        "--metrics", "--jinja", "-c", str(ctx), "--parallel", str(parallel), "--no-webui", *extra,
    ]
    return Service("llama-server", cmd, r"listening on http://127\.0\.0\.1:(?P<port>\d+)", health_path="/health")


def proxy(llama_url: str, **env_overrides: str) -> Service:
    env = dict(os.environ)
    env.update({"LLAMA_URL": llama_url, "PROXY_HOST": "127.0.0.1", "PROXY_PORT": "0", "PROXY_THREADS": "96",
                "DB_PATH": tempfile.mktemp(prefix="llamabridge-", suffix=".db")})
    env.update(env_overrides)
    # HEAD / is liveness: it answers without a key, whether or not llama-server does.
    return Service("proxy", [sys.executable, "-m", "proxy"], r"Listening at: http://127\.0\.0\.1:(?P<port>\d+)",
                   env=env, health_path="/", health_method="HEAD", cwd=ROOT)


def collector(llama_url: str, db_path: str, interval: float = 0.2, **env_overrides: str) -> Service:
    env = dict(os.environ)
    env.update({"LLAMA_URL": llama_url, "DB_PATH": db_path, "COLLECT_INTERVAL": str(interval),
                "COLLECTOR_HOST": "127.0.0.1", "COLLECTOR_PORT": "0"})
    env.update(env_overrides)
    return Service("collector", [sys.executable, "-m", "collector"], r"Listening at: http://127\.0\.0\.1:(?P<port>\d+)",
                   env=env, health_path="/healthz", cwd=ROOT)
