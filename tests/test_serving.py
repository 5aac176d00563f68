"""llamabridge/serving.py's gunicorn worker, on a real gunicorn with two threads.

The worker keeps the thread that answered a kept-alive connection waiting there for a moment for
the next request (see `serving.Worker`). These check what that must not break: requests back to
back and pipelined on one connection, a connection that went quiet, more connections than
threads, and a stop while a thread waits; and that a thread does wait, which rests on gunicorn
internals that a new gunicorn could change.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest

from llamabridge.serving import Worker
from tests.support import processes

pytestmark = pytest.mark.integration

# A WSGI app that answers with the request's path, under the same serve() the proxy and the
# collector use, with two threads.
APP = """
from llamabridge.serving import serve

def app(environ, start_response):
    body = environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

serve(lambda: app, bind="127.0.0.1:0", threads=2, keepalive=75, graceful_timeout=10, loglevel="info")
"""

# The same, with threads that wait on their connection for longer than a test takes, answering
# with the path and the thread that served it.
LINGERING_APP = """
import threading
from llamabridge.serving import Worker, serve

Worker.linger_ms = 60_000

def app(environ, start_response):
    body = f"{environ['PATH_INFO']} {threading.get_ident()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

serve(lambda: app, bind="127.0.0.1:0", threads=2, keepalive=75, graceful_timeout=10, loglevel="info")
"""


def serving(source: str) -> processes.Service:
    return processes.Service("serving", [sys.executable, "-c", source], r"Listening at: http://127\.0\.0\.1:(?P<port>\d+)",
                             cwd=processes.ROOT)


@pytest.fixture
def server():
    with serving(APP) as service:
        yield service


@pytest.fixture
def lingering_server():
    with serving(LINGERING_APP) as service:
        yield service


def connect(service) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def answers(sock: socket.socket, count: int) -> list[str]:
    """The next `count` answers' bodies on a kept-alive connection, in order."""
    buf = b""
    bodies: list[str] = []
    while len(bodies) < count:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"connection: close" not in head.lower(), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
            if len(rest) >= length:
                bodies.append(rest[:length].decode())
                buf = rest[length:]
                continue
        data = sock.recv(65536)
        assert data, f"connection closed after {len(bodies)} of {count} answers"
        buf += data
    assert not buf, buf
    return bodies


def test_requests_back_to_back_and_pipelined_on_one_connection(server):
    with connect(server) as sock:
        for i in range(20):
            sock.sendall(request(f"/{i}"))
            assert answers(sock, 1) == [f"/{i}"]
        # Two requests in one write: the second is already read when the first is answered.
        sock.sendall(request("/a") + request("/b"))
        assert answers(sock, 2) == ["/a", "/b"]


def test_a_connection_that_went_quiet_is_still_served(server):
    with connect(server) as sock:
        sock.sendall(request("/first"))
        assert answers(sock, 1) == ["/first"]
        # Quiet for longer than a thread waits on it: it is back with gunicorn's poller by now.
        time.sleep(Worker.linger_ms / 1000 * 4)
        sock.sendall(request("/later"))
        assert answers(sock, 1) == ["/later"]


def test_more_connections_than_threads_are_all_served(server):
    socks = [connect(server) for _ in range(5)]
    try:
        for round_ in range(3):
            order = socks if round_ % 2 == 0 else socks[::-1]
            for i, sock in enumerate(order):
                sock.sendall(request(f"/{round_}-{i}"))
            for i, sock in enumerate(order):
                assert answers(sock, 1) == [f"/{round_}-{i}"]
    finally:
        for sock in socks:
            sock.close()


def test_a_stop_does_not_wait_for_a_kept_alive_connection(server):
    with connect(server) as sock:
        sock.sendall(request("/"))
        answers(sock, 1)
        os.killpg(server.proc.pid, signal.SIGTERM)
        # gunicorn lets kept-alive connections linger 2 s at most on a stop, not the 75 s keep-alive.
        assert server.proc.wait(timeout=8) == 0
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed by the server, not left hanging


def test_each_thread_waits_on_the_connection_it_served(lingering_server):
    """The gunicorn internals `serving.Worker` relies on, pinned: gthread's `handle(conn)` returns
    True for a connection kept alive, and the worker's `alive`, `nr_conns`, `conn.sock` and the
    read-ahead buffer `conn.parser.unreader.buf` are there to be read (the pipelined test above
    covers the buffer's content). With the wait longer than the test, the thread that served a
    connection is still waiting on it when its next request comes, so the other connection gets
    the other thread, every time. Without the wait, gthread gives each request to whichever
    thread is idle, and the two connections' requests mix over both threads."""
    threads: dict[str, set[str]] = {"/a": set(), "/b": set()}
    with connect(lingering_server) as a, connect(lingering_server) as b:
        for _ in range(10):
            for sock, path in ((a, "/a"), (b, "/b"), (b, "/b"), (a, "/a")):
                sock.sendall(request(path))
                answered, thread = answers(sock, 1)[0].split()
                threads[answered].add(thread)
    assert len(threads["/a"]) == len(threads["/b"]) == 1 and threads["/a"] != threads["/b"], threads
