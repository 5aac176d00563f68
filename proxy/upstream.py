"""The one module that speaks HTTP to llama-server.

One HTTP/1.1 client (`_Connection`, a plain socket, and `Answer`, which reads the answer with
httptools), used two ways:
- `json()` / `request()`: small calls (`/props`, `/tokenize`, `/apply-template`, `/health`),
  each on a connection of its own that closes after the answer. llama-server serves every open
  connection on one of its threads until the connection closes or has been idle for 5 s, and
  when many connections arrive at once its pool can leave one queued with no thread to take
  it: that one waits until some other connection ends. With a kept-alive connection per proxy
  thread, that was up to 5 s: when 50 Claude Code sessions started at once, one `/apply-template`
  of a count_tokens burst waited 2.4 to 5.1 s in 8 of 13 runs, and every session's count with
  it. Closed after each answer, those connections free their threads at once (0 of 9 runs
  stalled), for a new connection's ~0.3 ms, next to the milliseconds these calls take.
- `open()`: generation requests, on connections kept for the next one. A non-streamed
  completion sends nothing until it is done, so while waiting for the answer we `poll()`
  llama-server's socket and look at the client's: if the client has gone, closing this
  connection is what makes llama-server stop generating and free the slot. An answer that goes
  quiet is watched by a `StallWatch`, which ends it once llama-server has stopped working on it
  (UPSTREAM_STALL_TIMEOUT). A connection whose
  answer was read to the end goes back to a small idle pool (`_Connections`) for the next
  request: a new TCP connection per request is a measurable part of what the proxy adds to a
  short one.

Before httptools (the C parser uvicorn uses), generations went through the standard library's
`http.client` and small calls through `requests`: answers went through the `email` package's
header parser and a Python chunked-body reader, about 0.2 ms of the ~1 ms a bare relay adds to a
1-token request on a 2-core machine. And `requests` keeps a connection for reuse unless the
answer says "Connection: close", which Python's http.server and servers like it do not (they
close it a moment later, failing the next call that took it).

llama-server closes the connection after every streamed answer (every Anthropic request is
streamed from it), so once such a response has gone to the client the pool opens the next
connection ahead of the next request (`_Connections.prepare`, called by the app).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.client import HTTPException, RemoteDisconnected
from typing import Any, Callable, Iterator
from urllib.parse import urlparse
from wsgiref.headers import Headers

import httptools

from . import fastjson
from .config import Settings
from .disconnect import ClientDisconnected, ClientWatch
from .errors import UPSTREAM_DOWN, ApiError, from_upstream

log = logging.getLogger("llamabridge.upstream")

# Hop-by-hop headers, and those the proxy's server sets itself, are never relayed; nor
# llama-server's CORS headers (it allows every origin): which pages may call is the proxy's to
# say (llamabridge/edge.py).
_SKIP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date",
                          "access-control-allow-origin", "access-control-allow-credentials", "access-control-allow-methods",
                          "access-control-allow-headers", "access-control-expose-headers", "access-control-max-age", "vary"}

# llama-server (cpp-httplib) closes a connection after 5 s idle; one idle for less than this is
# reused, an older one is closed rather than raced against the server's timer.
IDLE_REUSE_SECONDS = 2.0
# How often a request still waiting for its answer checks that llama-server is still there
# (`Upstream.stopped`).
STOPPED_CHECK_SECONDS = 1.0
# A quiet answer's StallWatch asks llama-server's task queue whether it still works after this
# long without a byte, and again this long after each answer (less with a short
# UPSTREAM_STALL_TIMEOUT, so that several fit in it).
PROBE_SECONDS = 5.0
# While an answer is quiet, how often its reader wakes to look at the probe (never while bytes flow).
QUIET_TICK_SECONDS = 1.0
# Routes that llama-server answers from its main loop (the task queue), in the order tried: a
# 404 or 501 means the route is disabled (--no-slots; --metrics not given). Not /health, which
# its HTTP threads answer even when the main loop hangs.
PROBE_PATHS = ("/slots", "/metrics")
# Errors that mean a kept-alive connection was closed by the server before it read our request.
_STALE = (ConnectionResetError, BrokenPipeError, RemoteDisconnected)
# What a broken connection to llama-server raises while a request is sent or its answer read.
BROKEN_CONNECTION = (OSError, HTTPException)


class UpstreamProtocolError(HTTPException):
    """llama-server's answer is not HTTP we can read, or ended before its body did."""


@dataclass(frozen=True)
class ServerInfo:
    """What the proxy needs to know about the upstream, read from `/props`."""

    model: str
    n_ctx: int
    total_slots: int
    vision: bool


@dataclass(frozen=True)
class Reply:
    """A small call's answer, read to its end."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


# A small call has no client to watch: it is short, and its answer is read whole.
_NO_CLIENT = ClientWatch({})


class Upstream:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.base = settings.upstream_base
        self._info: ServerInfo | None = None
        self._info_at = 0.0
        self._info_lock = threading.Lock()
        self._refreshing = threading.Lock()  # held while a background /props refresh runs
        parsed = urlparse(self.base)
        self._prefix = parsed.path.rstrip("/")
        host = parsed.hostname or "127.0.0.1"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        tls = ssl.create_default_context() if parsed.scheme == "https" else None
        self._host_header = parsed.netloc.rsplit("@", 1)[-1]
        self._new_connection = lambda: _Connection(host, port, settings.connect_timeout, tls)
        self.connections = _Connections(self._new_connection)
        self._probe_paths = list(PROBE_PATHS)  # those not found disabled yet
        self._probe_doubt_logged = False

    # -- plumbing ---------------------------------------------------------------------------

    def _request_bytes(self, method: str, path: str, body: bytes | None, content_type: str | None, close: bool) -> bytes:
        head = [f"{method} {self._prefix}{path} HTTP/1.1", f"Host: {self._host_header}", "Accept-Encoding: identity"]
        if close:
            head.append("Connection: close")
        if content_type:
            head.append(f"Content-Type: {content_type}")
        if self.settings.llama_api_key:
            head.append(f"Authorization: Bearer {self.settings.llama_api_key}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body or b'')}")
        return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (body or b"")

    def request(self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None) -> "Reply":
        """Send a small request on a connection of its own (closed after: never hold a
        llama-server thread idle, above) and return the answer, whatever its status.

        Raises ApiError(529) when llama-server cannot be reached at all, or does not answer.
        """
        conn = self._new_connection()
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise ApiError(529, UPSTREAM_DOWN.format(url=self.base, reason=_reason(exc)), retry_after=5) from None
            return self._ask(conn, method, path, json_body, timeout)
        finally:
            conn.close()

    def _ask(self, conn: "_Connection", method: str, path: str, json_body: Any, timeout: float | None) -> "Reply":
        """`request()` on a connection already open (the caller closes it)."""
        body = None if json_body is None else fastjson.dumps(json_body)
        data = self._request_bytes(method, path, body, "application/json" if body is not None else None, close=True)
        try:
            conn.send(data)
            assert conn.sock is not None
            conn.sock.settimeout(timeout or self.settings.read_timeout)
            answer = Answer(conn, None, head_only=method == "HEAD")
            try:
                return Reply(answer.status, read_all(answer, _NO_CLIENT))
            finally:
                answer.close()
        except TimeoutError:
            raise ApiError(529, f"llama-server at {self.base} did not answer in time", retry_after=5) from None
        except BROKEN_CONNECTION as exc:
            raise ApiError(529, UPSTREAM_DOWN.format(url=self.base, reason=_reason(exc)), retry_after=5) from None

    def json(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """A small JSON call; a non-2xx answer raises the ApiError a client should see."""
        resp = self.request(method, path, json_body=body, timeout=timeout)
        if resp.status_code >= 400:
            raise from_upstream(resp.status_code, resp.content)
        try:
            return fastjson.loads(resp.content)
        except ValueError:
            raise ApiError(502, f"llama-server answered {path} with something that is not JSON") from None

    def open(self, method: str, path: str, body: bytes | None, watch: ClientWatch,
             content_type: str | None = "application/json") -> "Answer":
        """Send a generation request and return the response once its headers arrive.

        Raises ApiError(529) if llama-server cannot be reached, ClientDisconnected if the client
        left while we waited (the upstream connection is closed by then). The caller reads the
        body (`stream_chunks`, `stream_lines`) and must `close()` the response.
        """
        request = self._request_bytes(method, path, body, content_type, close=False)

        def send(conn: _Connection) -> Answer:
            conn.send(request)
            return self._answer(conn, watch, method)

        conn, reused = self.connections.get()
        try:
            try:
                return send(conn)
            except _STALE:
                if not reused:
                    raise
                # The server closed the idle connection as we sent: it never saw the request.
                conn.close()
                conn = self.connections.new()
                return send(conn)
        except BROKEN_CONNECTION as exc:
            conn.close()
            raise ApiError(529, UPSTREAM_DOWN.format(url=self.base, reason=_reason(exc)), retry_after=5) from None

    def _answer(self, conn: "_Connection", watch: ClientWatch, method: str) -> "Answer":
        """Wait for the answer's headers, watching the client while llama-server works."""
        sock = conn.sock
        assert sock is not None
        stall = StallWatch(self) if self.settings.stall_timeout > 0 else None
        try:
            now = time.monotonic()
            deadline, next_check = now + self.settings.read_timeout, now + STOPPED_CHECK_SECONDS
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while not poller.poll(200):
                if watch.gone():
                    raise ClientDisconnected()
                now = time.monotonic()
                if now > deadline:
                    raise ApiError(504, f"llama-server sent nothing for {self.settings.read_timeout:.0f}s (UPSTREAM_READ_TIMEOUT)")
                if now >= next_check:
                    why = self.stopped()
                    if why:
                        raise ApiError(529, f"{why} while this request waited for its answer; retry", retry_after=5)
                    next_check = time.monotonic() + STOPPED_CHECK_SECONDS
                if stall is not None:
                    stall.quiet()
            # Was the connect timeout. With a StallWatch, a quiet answer wakes its reader every
            # tick to look at the probe (Answer._recv), and UPSTREAM_READ_TIMEOUT is counted there.
            sock.settimeout(self.settings.read_timeout if stall is None else stall.tick)
            answer = Answer(conn, self.connections, head_only=method == "HEAD", stall=stall)
            if stall is not None:
                stall.heard()  # the headers are progress; the body's silence is counted from here
            return answer
        except (ApiError, ClientDisconnected):
            if stall is not None:
                stall.close()
            conn.close()
            raise
        except BaseException:
            if stall is not None:
                stall.close()
            raise

    def stopped(self) -> str | None:
        """Why llama-server will never answer a request it has taken, or None if it still may.

        Stopped (SIGTERM, Ctrl-C), llama-server closes its port and its idle connections at once,
        but a request it is working on gets neither an answer nor a close: the old process waits
        for the client to hang up, and the proxy would wait UPSTREAM_READ_TIMEOUT, holding the
        slot and every request queued behind it. So a request waiting for its answer asks every
        STOPPED_CHECK_SECONDS on a new connection: a port that refuses it, or a new llama-server
        there still loading its model, means this answer will never come. A server slow to
        answer means nothing (it may be prefilling a long prompt), nor does any other failure.
        Not seen: a new llama-server that has loaded its model within one check.
        """
        conn = self._new_connection()
        try:
            conn.connect()
            resp = self._ask(conn, "GET", "/health", None, STOPPED_CHECK_SECONDS)
        except ConnectionRefusedError:
            return f"llama-server at {self.base} stopped (its port refuses connections)"
        except (OSError, ApiError):
            return None
        finally:
            conn.close()
        if resp.status_code == 503 and b"Loading model" in resp.content:
            return f"llama-server at {self.base} was restarted (a new one is loading its model)"
        return None

    def send_probe(self, timeout: float) -> "_Connection | None":
        """Ask llama-server's task queue for a sign of life: a request to the first probe route not
        found disabled, sent on a connection of its own and left for the caller to poll
        (`probe_answered`), so that a reader waits for it without blocking. None when it could
        not be sent (llama-server unreachable: no sign of life either)."""
        if not self._probe_paths:
            return None
        conn = self._new_connection()
        conn.timeout = min(conn.timeout, timeout)
        try:
            conn.send(self._request_bytes("GET", self._probe_paths[0], None, None, close=True))
            assert conn.sock is not None
            conn.sock.settimeout(timeout)  # for reading the answer, once it has begun to arrive
        except OSError:
            conn.close()
            return None
        return conn

    def probe_answered(self, conn: "_Connection") -> bool | None:
        """Read the answer to `send_probe` (its socket is readable) and close its connection.

        True: llama-server's main loop answered, so it is working. False: it did not (the
        connection broke). None: the route is disabled, ask the next one now. Any other status
        (401 with a wrong LLAMA_API_KEY, ...) cannot tell, and counts as working: a request is
        never ended on a guess.
        """
        path = self._probe_paths[0] if self._probe_paths else "?"
        try:
            answer = Answer(conn, None)
            try:
                status = answer.status
                read_all(answer, _NO_CLIENT)
            finally:
                answer.close()
        except BROKEN_CONNECTION:
            return False
        finally:
            conn.close()
        if status == 200:
            return True
        if status in (404, 501) and path in self._probe_paths:
            # Rebound, not changed in place: other requests' watches read the list meanwhile.
            self._probe_paths = [other for other in self._probe_paths if other != path]
            if self._probe_paths:
                return None
        if not self._probe_doubt_logged:
            self._probe_doubt_logged = True
            log.warning("llama-server answered %s with HTTP %d: a request it stops working on cannot be told from a slow one, "
                        "so UPSTREAM_STALL_TIMEOUT does not apply (enable /slots or --metrics, and check LLAMA_API_KEY)",
                        path, status)
        return True

    def can_probe(self) -> bool:
        return bool(self._probe_paths)

    def stalled(self, quiet: float) -> ApiError:
        """Count and log a request given up on (StallWatch), and the error its client gets."""
        self.connections.count_stall()
        message = (f"llama-server at {self.base} stopped working on this request: nothing on its connection and no answer "
                   f"from its main loop ({self._probe_paths[0] if self._probe_paths else '/slots'}) for {quiet:.0f}s "
                   f"(UPSTREAM_STALL_TIMEOUT={self.settings.stall_timeout:g}); retry")
        log.warning("%s", message)
        return ApiError(529, message, retry_after=5)

    # -- facts about the server ---------------------------------------------------------------

    def info(self, max_age: float = 30.0) -> ServerInfo:
        """`/props`, read once and then kept fresh in the background (llama-server can be restarted
        with a new model, context or slot count).

        Only the first call waits for llama-server. Once the copy is older than `max_age`, the
        next call starts one background refresh and returns the copy it has: an agent's request
        after a pause never waits for `/props`, and a restarted llama-server's new settings
        apply from the request after it. A failed refresh keeps the old copy (the request itself
        will find llama-server down) and is retried by the next call.
        """
        info = self._info
        if info is None:
            with self._info_lock:
                if self._info is None:
                    self._info, self._info_at = self._read_props(), time.monotonic()
                return self._info
        if time.monotonic() - self._info_at >= max_age and self._refreshing.acquire(blocking=False):
            threading.Thread(target=self._refresh, name="llamabridge-props", daemon=True).start()
        return info

    def _refresh(self) -> None:
        try:
            self._info, self._info_at = self._read_props(), time.monotonic()
        except ApiError as exc:
            log.debug("refreshing /props failed, keeping the last copy: %s", exc.message)
        finally:
            self._refreshing.release()

    def _read_props(self) -> ServerInfo:
        props = self.json("GET", "/props", timeout=10)
        settings = props.get("default_generation_settings") or {}
        modalities = props.get("modalities") or {}
        alias = str(props.get("model_alias") or props.get("model_path") or "local")
        if "/" in alias and alias.endswith(".gguf"):
            alias = os.path.basename(alias)  # llama-server's default alias is the model's path
        return ServerInfo(
            model=self.settings.upstream_model or alias,
            n_ctx=int(settings.get("n_ctx") or 0),
            total_slots=int(props.get("total_slots") or 1),
            vision=bool(modalities.get("vision")),
        )

    def health(self) -> tuple[bool, str]:
        """(reachable and ready, a short reason)."""
        try:
            resp = self.request("GET", "/health", timeout=5)
        except ApiError as exc:
            return False, exc.message
        if resp.status_code == 200:
            return True, "ok"
        return False, f"llama-server /health answered HTTP {resp.status_code}: {resp.text[:200]}"


class _Connections:
    """Connections to llama-server: new ones, and those whose last answer was read to the end,
    kept idle (newest first) for the next request."""

    def __init__(self, factory: Callable[[], "_Connection"], limit: int = 8):
        self._factory = factory
        self.limit = limit
        self.opened = 0  # for /metrics
        self.stalls = 0  # answers given up on because llama-server stopped working on them (StallWatch), for /metrics
        self._idle: deque[tuple[float, _Connection]] = deque()
        self._lock = threading.Lock()
        self._owed = False  # a connection was closed after its answer: prepare() opens the next one

    def new(self) -> "_Connection":
        with self._lock:
            self.opened += 1
        return self._factory()

    def get(self) -> tuple["_Connection", bool]:
        """(connection, reused): a recently used one still open, else a new one."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._idle:
                    break
                since, conn = self._idle.pop()
            # An idle connection's socket is readable only if the server closed it.
            if now - since < IDLE_REUSE_SECONDS and conn.sock is not None and not _readable(conn.sock):
                return conn, True
            conn.close()
        return self.new(), False

    def count_stall(self) -> None:
        with self._lock:
            self.stalls += 1

    def closed_one(self) -> None:
        """A connection was closed after its answer (llama-server ends one after every streamed
        answer, and the proxy hangs up on one whose client left): `prepare()` opens the next."""
        self._owed = True

    def prepare(self) -> None:
        """Open the connection the next request will need now, if one was closed and none is
        idle. Called once a response has gone to the client: accepting a new connection and
        handing it to a thread costs llama-server about 0.3 ms on a 2-core machine, which an
        agent's next request (usually within a second, in a tool loop) would otherwise wait
        for. One left unused is dropped by `get()` once older than IDLE_REUSE_SECONDS, as any
        idle connection is."""
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

    def give(self, conn: "_Connection") -> None:
        with self._lock:
            if len(self._idle) < self.limit:
                self._idle.append((time.monotonic(), conn))
                return
        conn.close()


class _Connection:
    """One HTTP/1.1 connection to llama-server: a socket, opened on first use."""

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None):
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
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


class StallWatch:
    """Ends an answer that llama-server has stopped working on.

    A llama-server that hangs (stopped with SIGSTOP, its main loop deadlocked) keeps the
    connection open and sends nothing more; read with UPSTREAM_READ_TIMEOUT alone, the request
    would hold its slot, and every request queued behind it, for ten minutes. Silence alone
    proves nothing, though: a non-streamed answer is silent until it is done, and a long prompt's
    prefill sends nothing for minutes. So once an answer has been quiet for `every` seconds, the
    watch asks llama-server's main loop for a sign of life (`Upstream.send_probe`: `/slots`, else
    `/metrics`, which go through its task queue), one request at a time, again `every` seconds
    after each answer. A byte of the answer or an answer to the probe is progress; none for
    UPSTREAM_STALL_TIMEOUT seconds raises the client's 529 (`Upstream.stalled`).

    llama-server's SSE pings (`:` comment frames) are not progress: its HTTP thread sends them on
    a timer whatever the main loop does. Nothing here runs while bytes flow: the reader calls
    `quiet()` only when its socket has been silent for a tick, or on a ping.
    """

    def __init__(self, upstream: Upstream):
        self._upstream = upstream
        self.limit = upstream.settings.stall_timeout
        self.read_timeout = upstream.settings.read_timeout
        self.every = min(PROBE_SECONDS, self.limit / 4)
        self.tick = min(QUIET_TICK_SECONDS, self.every)
        self.quiet_since: float | None = None  # None while the answer makes progress
        self._probe: _Connection | None = None
        self._next_probe = 0.0

    def heard(self) -> None:
        """A byte of the answer arrived: llama-server is working on it."""
        self.quiet_since = None
        self._drop_probe()

    def quiet(self, silent_for: float = 0.0) -> None:
        """The answer makes no progress now (quiet for `silent_for` seconds already, if it has
        just gone quiet): look at the probe, send one when due, raise past the limit."""
        now = time.monotonic()
        if self.quiet_since is None:
            self.quiet_since = now - silent_for
            self._next_probe = self.quiet_since + self.every
        probe = self._probe
        if probe is not None:
            if probe.sock is None or _readable(probe.sock):
                self._probe = None
                working = self._upstream.probe_answered(probe)
                now = time.monotonic()
                if working:
                    self.quiet_since = now
                self._next_probe = now if working is None else now + self.every
        if self._probe is None and now >= self._next_probe:
            if not self._upstream.can_probe():
                self.quiet_since = now  # nothing can tell a hung llama-server from a busy one
                return
            self._probe = self._upstream.send_probe(self.every)
            self._next_probe = now + self.every  # used only if the probe could not be sent
        if now - self.quiet_since >= self.limit:
            self._drop_probe()
            raise self._upstream.stalled(now - self.quiet_since)

    def _drop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()

    def close(self) -> None:
        self._drop_probe()


def _readable(sock: socket.socket) -> bool:
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
    """A response from `Upstream.open`, owning its connection until `close()`, which keeps the
    connection for the next request if the answer was read to the end, else hangs up (which is
    what stops llama-server generating for a client that left).

    Reads the status line and headers when made; `read_some()` gives the body as it arrives.
    """

    def __init__(self, conn: _Connection, pool: _Connections | None, head_only: bool = False,
                 stall: StallWatch | None = None):
        self._conn: _Connection | None = conn
        self._pool = pool
        self._stall = stall
        self._parsed = _Parsed()
        self._parser = self._parsed.parser
        self.finished = False  # set by stream_chunks once the body was read to its end
        received = False
        while not self._parsed.head_done:
            data = self._recv()
            if not data:
                if not received:  # the server closed the connection without a byte of answer
                    raise RemoteDisconnected("llama-server closed the connection without answering")
                raise UpstreamProtocolError("llama-server closed the connection in the middle of the answer's headers")
            received = True
            self._feed(data)
        self.status: int = self._parser.get_status_code()
        self.headers = Headers(self._parsed.headers)
        self.content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if head_only:  # the answer to HEAD has headers only, whatever its Content-Length says
            self._parsed.complete = True
            self._parsed.messages += 1  # so the connection is not reused: its framing is ours to guess
        # Neither a length nor chunks: the body ends when llama-server closes the connection.
        self._until_close = "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers

    def _recv(self) -> bytes:
        assert self._conn is not None and self._conn.sock is not None
        sock = self._conn.sock
        stall = self._stall
        if stall is None:
            return sock.recv(65536)
        # The socket's timeout is the watch's tick: each one that passes without a byte is a
        # moment to look at the probe, until UPSTREAM_READ_TIMEOUT of silence.
        silent_since = None
        while True:
            try:
                return sock.recv(65536)
            except TimeoutError:
                now = time.monotonic()
                if silent_since is None:
                    silent_since = now - stall.tick
                if now - silent_since >= stall.read_timeout:
                    raise
                stall.quiet(now - silent_since)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise UpstreamProtocolError(f"llama-server's answer is not valid HTTP: {exc}") from None

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
                raise UpstreamProtocolError("llama-server closed the connection before the end of the answer")
            self._feed(data)
        body = parsed.body[0] if len(parsed.body) == 1 else b"".join(parsed.body)
        parsed.body.clear()
        stall = self._stall
        if stall is not None:
            if body[0] == 58 and not body.strip(b":\r\n"):  # only ":" comment frames: llama-server's pings
                stall.quiet()
            elif stall.quiet_since is not None:
                stall.heard()
        return body

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._stall is not None:
            self._stall.close()
        self._parsed.parser = None  # the parser holds _parsed: no cycle left for the collector
        # Only an answer read to its end, and nothing after it, leaves the connection clean for
        # the next request. After a stream, llama-server closes the connection whatever its
        # headers said (Keep-Alive): hang up too, and let the pool open the next request's
        # connection ahead of it.
        clean = self.finished and self._parsed.messages == 1 and self._parsed.keep_alive
        if self._pool is None:  # a small call's own connection
            conn.close()
        elif clean and self.content_type != "text/event-stream":
            self._pool.give(conn)
        else:
            conn.close()
            self._pool.closed_one()


def relay_headers(resp: Answer) -> list[tuple[str, str]]:
    return [(k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE_HEADERS]


def stream_chunks(answer: Answer, watch: ClientWatch) -> Iterator[bytes]:
    """The body as it arrives (what one read of the socket brought), checking the client each time."""
    read = answer.read_some
    while chunk := read():
        watch.check()
        yield chunk
    answer.finished = True


def stream_lines(resp: Answer, watch: ClientWatch) -> Iterator[bytes]:
    """The body line by line (without line endings), for server-sent events."""
    pending = b""
    for chunk in stream_chunks(resp, watch):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def read_all(resp: Answer, watch: ClientWatch) -> bytes:
    return b"".join(stream_chunks(resp, watch))


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
