"""A small HTTP/1.1 client: connections on plain sockets, a pool of idle ones, and answers read
with httptools.

Made for one server that is asked many short requests: a new TCP connection per request, or a
Python parser of headers and chunks, would be a measurable part of what a relay adds to each.
So an answer is parsed by httptools (the C parser uvicorn uses), and a connection whose answer
was read to its end goes back to a small idle pool (`Pool`) for the next request. The server
may close an idle connection at any moment: `Pool.send` retries a request, once, on a new
connection when a reused one turns out to have been closed before the server read it.

It knows nothing of what the server is: `proxy/upstream.py` says which server, and when a
quiet answer has gone on too long (`Silence`).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http.client import HTTPException, RemoteDisconnected
from typing import Protocol, TypeVar
from wsgiref.headers import Headers

import httptools

log = logging.getLogger("llamabridge.http1")

T = TypeVar("T")

# Errors that mean a kept-alive connection was closed by the server before it read our request.
STALE = (ConnectionResetError, BrokenPipeError, RemoteDisconnected)
# What a broken connection raises while a request is sent or its answer read.
BROKEN_CONNECTION = (OSError, HTTPException)


class ProtocolError(HTTPException):
    """The server's answer is not HTTP we can read, or ended before its body did."""


class Silence(Protocol):
    """Watches an answer while it sends nothing (`Answer`'s `silence`).

    While one watches, the socket's timeout is `tick`: each tick without a byte calls `quiet()`,
    which may raise to end the answer, until `read_timeout` seconds of silence raise TimeoutError.
    """

    tick: float
    read_timeout: float

    def quiet(self, silent_for: float = 0.0) -> None:
        """Nothing has arrived for `silent_for` seconds."""

    def received(self, body: bytes) -> None:
        """Body bytes arrived."""

    def close(self) -> None:
        """The answer is over."""


class Watch(Protocol):
    """What a body is read for: `check()` raises once it no longer wants it (its client left)."""

    def check(self) -> None: ...


class Connection:
    """One HTTP/1.1 connection: a socket, opened on first use. `peer` names the server in errors."""

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None, peer: str = "the server"):
        self.host, self.port, self.timeout, self.tls, self.peer = host, port, timeout, tls, peer
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write; send it now
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def send(self, data: bytes) -> None:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(data)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class Pool:
    """Connections to one server: new ones, and those whose last answer was read to the end, kept
    idle (newest first) for the next request.

    `idle_reuse`: an idle connection older than this is closed rather than reused (raced against
    the server's own idle timer). `keep_after_streams`: whether a connection that carried a
    server-sent-events answer is kept (not if the server closes it after every stream).
    """

    def __init__(self, factory: Callable[[], Connection], idle_reuse: float, keep_after_streams: bool = True,
                 limit: int = 8):
        self._factory = factory
        self.idle_reuse = idle_reuse
        self.keep_after_streams = keep_after_streams
        self.limit = limit
        self.opened = 0  # for /metrics
        self._idle: deque[tuple[float, Connection]] = deque()
        self._lock = threading.Lock()
        self._owed = False  # a connection was closed after its answer: prepare() opens the next one

    def new(self) -> Connection:
        with self._lock:
            self.opened += 1
        return self._factory()

    def get(self) -> tuple[Connection, bool]:
        """(connection, reused): a recently used one still open, else a new one."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._idle:
                    break
                since, conn = self._idle.pop()
            # An idle connection's socket is readable only if the server closed it.
            if now - since < self.idle_reuse and conn.sock is not None and not readable(conn.sock):
                return conn, True
            conn.close()
        return self.new(), False

    def send(self, request: bytes, answer: Callable[[Connection], T]) -> T:
        """Send `request` on a pooled connection and return `answer(conn)`, which reads (the head
        of) its answer and owns the connection from then on.

        A reused connection that the server closed as we sent never had the request read: it is
        sent again on a new connection. Any other broken connection is closed and its error raised.
        """
        conn, reused = self.get()
        try:
            try:
                conn.send(request)
                return answer(conn)
            except STALE:
                if not reused:
                    raise
                conn.close()
                conn = self.new()
                conn.send(request)
                return answer(conn)
        except BROKEN_CONNECTION:
            conn.close()
            raise

    def closed_one(self) -> None:
        """A connection was closed after its answer (the server ended it, or the caller hung up on
        an answer it no longer wanted): `prepare()` opens the next."""
        self._owed = True

    def prepare(self) -> None:
        """Open the connection the next request will need now, if one was closed and none is
        idle, so that the next request does not wait for the server to accept it. Call it when
        nothing waits on this thread (after a response has gone out). One left unused is dropped
        by `get()` once older than `idle_reuse`, as any idle connection is."""
        with self._lock:
            owed, self._owed = self._owed, False
            if not owed or self._idle:
                return
        conn = self.new()
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            log.debug("opening a connection ahead of the next request failed: %s", exc)
            return
        self.give(conn)

    def give(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < self.limit:
                self._idle.append((time.monotonic(), conn))
                return
        conn.close()


def readable(sock: socket.socket) -> bool:
    """Whether a socket has something to read (or was closed by its peer), without waiting.
    poll(), not select(): select() cannot watch a descriptor numbered 1024 or above."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _Parsed:
    """httptools' callbacks for one answer: headers, then the body as it is decoded (chunked
    framing removed)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.messages = 0
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # the parser forgets it once the answer ends

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Answer:
    """An answer on a connection, owning it until `close()`, which gives the connection back to
    its pool if the answer was read to the end, else hangs up (which is how a caller tells the
    server it no longer wants the rest).

    Reads the status line and headers when made; `read_some()` gives the body as it arrives. With
    no pool, the connection is closed after the answer whatever it was.
    """

    def __init__(self, conn: Connection, pool: Pool | None, head_only: bool = False, silence: Silence | None = None):
        self._conn: Connection | None = conn
        self._pool = pool
        self._silence = silence
        self._parsed = _Parsed()
        self._parser = self._parsed.parser
        self.finished = False  # set by stream_chunks once the body was read to its end
        received = False
        while not self._parsed.head_done:
            data = self._recv()
            if not data:
                if not received:  # the server closed the connection without a byte of answer
                    raise RemoteDisconnected(f"{conn.peer} closed the connection without answering")
                raise ProtocolError(f"{conn.peer} closed the connection in the middle of the answer's headers")
            received = True
            self._feed(data)
        self.status: int = self._parser.get_status_code()
        self.headers = Headers(self._parsed.headers)
        self.content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if head_only:  # the answer to HEAD has headers only, whatever its Content-Length says
            self._parsed.complete = True
            self._parsed.messages += 1  # so the connection is not reused: its framing is ours to guess
        # Neither a length nor chunks: the body ends when the server closes the connection.
        self._until_close = "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers

    def _recv(self) -> bytes:
        assert self._conn is not None and self._conn.sock is not None
        sock = self._conn.sock
        silence = self._silence
        if silence is None:
            return sock.recv(65536)
        # The socket's timeout is the watch's tick: each one that passes without a byte is the
        # watch's moment to look, until `read_timeout` of silence.
        silent_since = None
        while True:
            try:
                return sock.recv(65536)
            except TimeoutError:
                now = time.monotonic()
                if silent_since is None:
                    silent_since = now - silence.tick
                if now - silent_since >= silence.read_timeout:
                    raise
                silence.quiet(now - silent_since)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            assert self._conn is not None
            raise ProtocolError(f"{self._conn.peer}'s answer is not valid HTTP: {exc}") from None

    def read_some(self) -> bytes:
        """The body bytes that have arrived since the last call, waiting for some; b"" at the end."""
        parsed = self._parsed
        while not parsed.body:
            if parsed.complete or self._conn is None:
                return b""
            data = self._recv()
            if not data:
                if self._until_close:
                    parsed.complete = True
                    parsed.messages += 1  # the connection is closed: never reused
                    return b""
                raise ProtocolError(f"{self._conn.peer} closed the connection before the end of the answer")
            self._feed(data)
        body = parsed.body[0] if len(parsed.body) == 1 else b"".join(parsed.body)
        parsed.body.clear()
        if self._silence is not None:
            self._silence.received(body)
        return body

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._silence is not None:
            self._silence.close()
        del self._parsed.parser  # the parser holds _parsed: no cycle left for the collector
        # Only an answer read to its end, and nothing after it, leaves the connection clean for
        # the next request.
        clean = self.finished and self._parsed.messages == 1 and self._parsed.keep_alive
        pool = self._pool
        if pool is None:
            conn.close()
        elif clean and (pool.keep_after_streams or self.content_type != "text/event-stream"):
            pool.give(conn)
        else:
            conn.close()
            pool.closed_one()


def stream_chunks(answer: Answer, watch: Watch) -> Iterator[bytes]:
    """The body as it arrives (what one read of the socket brought), checking the watch each time."""
    read = answer.read_some
    while chunk := read():
        watch.check()
        yield chunk
    answer.finished = True


def stream_lines(answer: Answer, watch: Watch) -> Iterator[bytes]:
    """The body line by line (without line endings), for server-sent events."""
    pending = b""
    for chunk in stream_chunks(answer, watch):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def read_all(answer: Answer, watch: Watch) -> bytes:
    return b"".join(stream_chunks(answer, watch))
