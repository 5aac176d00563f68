"""Run a Flask app under gunicorn as one process with threads (the proxy and the collector both),
and the start-up both share: settings or a one-line error, the store checked, logging.

One process, never several: the proxy's admission gate and session state, and the collector's
scheduler, must each exist exactly once.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import sys
import traceback
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from llamabridge.settings import ConfigError, load_env_file


class _Settings(Protocol):
    @property
    def log_level(self) -> str: ...


S = TypeVar("S", bound=_Settings)


def settings_or_exit(service: str, from_env: Callable[[], S]) -> S:
    """A service's settings from .env and the environment, with logging set to their level; a bad
    value is printed in one line and ends the process with status 2."""
    try:
        load_env_file()
        settings = from_env()
    except ConfigError as exc:
        print(f"llamabridge {service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    start_logging(settings.log_level)
    return settings


def store_or_exit(service: str, db_path: str) -> None:
    """Create (or open) and migrate the SQLite store before serving: a DB_PATH that cannot hold
    it, or a file that is not a store, is one line naming DB_PATH and status 2, rather than a
    traceback from a worker that failed to boot."""
    import sqlite3

    from .store import Store  # the proxy without a request log never needs it

    try:
        Store(db_path).close()
    except (OSError, sqlite3.Error) as exc:
        print(f"llamabridge {service}: DB_PATH={db_path}: cannot open the store: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def protocol_body(status: int, message: str) -> dict[str, Any]:
    """For a request the HTTP server could not parse (a malformed request line, headers too
    large), answered before any route is known: the fields both APIs' envelopes share, so an
    Anthropic and an OpenAI client each read it as their own (`error.type`, `error.message`)."""
    error_type = "api_error" if status >= 500 else "permission_error" if status == 403 else "invalid_request_error"
    return {"type": "error", "error": {"type": error_type, "message": message, "code": status}}


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's answer to a request it cannot parse, as JSON in place of its HTML page
    (pinned by tests/test_proxy_errors.py::test_requests_the_http_server_cannot_parse_get_json_both_sdks_read).

    gunicorn answers such requests itself, before the app sees them (a malformed request line,
    a header over 8 KB, a URI over 4 KB), through `gunicorn.util.write_error`, the one function
    its workers call for it; it has no setting for the format. An SDK shows an HTML page as
    "Error code: 400 - <html>..."; this body reads as its own error in either API.
    """
    message = f"{reason}: {mesg}" if mesg else reason
    body = json.dumps(protocol_body(status_int, message)).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    gunicorn_util.write_nonblock(sock, head + body)


# glibc's mallopt() parameter (malloc.h) for the size from which a block gets its own mapping.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def return_large_blocks_to_the_os() -> None:
    """Have glibc give every freed block of 128 KB or more straight back to the OS.

    The proxy's large buffers (request bodies, a long conversation's rendered prompt and its
    /tokenize body: hundreds of KB each, dozens at once when sessions start together) are
    short-lived. glibc maps such a block on its own only until one is freed: it then raises its
    threshold to that size (up to 32 MB), so every later buffer is carved from a thread's heap,
    where what is freed stays resident. Setting the threshold fixes it at glibc's own starting
    value and turns that adjustment off; the resident size then follows the live buffers, at
    the cost of a mapping per large buffer, rare and small beside the work that made it.
    A C library without mallopt (musl's is a no-op, macOS has none) keeps its own behaviour.
    """
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def checked_in_a_child(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `check` in a forked child and return what it returns (JSON-able), or end this process
    with the child's status (2, after its one-line message, for settings, a store or an address
    it refuses).

    `check` is everything start-up is refused on: the settings, the store, the keys file. It
    needs modules (SQLite, hashlib, the settings and edge code) that gunicorn's arbiter, which this process becomes, never uses again; what the arbiter imports
    stays resident in it and is counted again in the worker it forks. Checked in a child that
    exits, they never load here; the worker imports them for itself.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: check, answer, and exit without running anything of the parent's
        os.close(read)
        code = 0
        try:
            os.write(write, json.dumps(check()).encode())
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a bug in a check: show it, refuse to start
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        data = answer.read()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise SystemExit(code)
    return json.loads(data)


def start_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Worker(ThreadWorker):
    """gunicorn's threaded worker, keeping a thread on a kept-alive connection for a moment.

    gthread hands every request on a kept-alive connection across two threads: its main thread
    waits for the socket to turn readable, then passes the connection to a pool thread, and the
    pool thread passes it back through a pipe when the answer is out. That is three wake-ups and
    as many hand-overs of the GIL per request, on the path of every one (the benchmark's floor
    rows show the cost). Clients that talk back to back (an agent's token counts, an SDK's retries, a
    benchmark) mostly send their next request within microseconds of reading an answer; this
    worker waits for it on the thread that served the last one, for up to `linger_ms`, and
    only then hands the connection back to gthread's poller as before.

    It lingers only while there are no more open connections than threads, so every connection
    still has a thread to go to; the most a waiting thread can cost a connection opened meanwhile
    is one `linger_ms`. Everything else (parsing, keep-alive limits, draining unread bodies,
    graceful stop) is gthread's own code, called as it is.

    What it reads of gthread beyond its documented settings, each pinned by tests/test_serving.py:
    `handle(conn)` returning True for a kept-alive connection, `alive`, `nr_conns` and `conn.sock`
    (test_each_thread_waits_on_the_connection_it_served), and the bytes its parser read ahead,
    `conn.parser.unreader.buf` (test_requests_back_to_back_and_pipelined_on_one_connection).
    """

    linger_ms = 50

    def handle(self, conn):
        keepalive = super().handle(conn)
        while keepalive is True and self.alive and self.nr_conns <= self.cfg.threads:
            # A body read ahead of the last request may already hold the next one.
            if not conn.parser.unreader.buf.getvalue():
                poller = select.poll()
                poller.register(conn.sock, select.POLLIN)
                if not poller.poll(self.linger_ms):
                    break  # quiet: back to gthread's poller, which keeps it until `keepalive`
            keepalive = super().handle(conn)
        return keepalive


class _Server(BaseApplication):
    def __init__(self, load: Callable[[], Any], options: dict[str, Any]):
        self._load = load
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        options = {
            "workers": 1,
            "worker_class": Worker,
            "errorlog": "-",
            # gunicorn 23+'s control socket has one fixed path per user: two of our services (or a
            # service and a test run) would fight over it, and we do not use it.
            "control_socket_disable": True,
            **self._options,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        return_large_blocks_to_the_os()  # in the worker, which holds the buffers
        app = self._load()
        # What start-up built (modules, the app, its routes and metrics) lives as long as the
        # process. Frozen, it is out of the garbage collector's sight: a full collection then
        # walks only what requests made, instead of pausing every thread for milliseconds at
        # unpredictable times to walk start-up's tens of thousands of objects again.
        gc.collect()
        gc.freeze()
        return app


def serve(load: Callable[[], Any], **options: Any) -> None:
    """Serve the app `load()` builds (called in the worker) with these gunicorn settings."""
    gunicorn_util.write_error = _write_json_error
    _Server(load, options).run()
