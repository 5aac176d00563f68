"""llama-server's API as the proxy uses it: what the proxy asks of it, and how.

Requests go over the HTTP/1.1 client in `proxy/http1.py`, two ways:
- `json()` / `request()`: small calls (`/props`, `/tokenize`, `/apply-template`, `/health`),
  each on a connection of its own that closes after the answer. llama-server serves every open
  connection on one of its threads until the connection closes or has been idle for 5 s, and
  when many connections arrive at once its pool can leave one queued with no thread to take
  it: that one waits until some other connection ends. Kept alive, the small calls' connections
  would hold threads idle, and a burst of token counts (many agent sessions starting at once)
  could wait for one of them to time out; closed after each answer, they free their threads at
  once, for the small cost of a new connection.
- `open()`: generation requests, on pooled connections kept for the next one. A non-streamed
  completion sends nothing until it is done, so while waiting for the answer we `poll()`
  llama-server's socket and look at the client's: if the client has gone, closing this
  connection is what makes llama-server stop generating and free the slot. An answer that goes
  quiet is watched by a `StallWatch`, which ends it once llama-server has stopped working on it
  (UPSTREAM_STALL_TIMEOUT).

llama-server closes the connection after every streamed answer (every Anthropic request is
streamed from it), so once such a response has gone to the client the pool opens the next
connection ahead of the next request (`Connections.prepare`, called by the app).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from . import fastjson
from .config import Settings
from .disconnect import ClientDisconnected, ClientWatch
from .errors import UPSTREAM_DOWN, ApiError, from_upstream
from .http1 import BROKEN_CONNECTION, Answer, Connection, Pool, read_all, readable

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


class Unanswered(ApiError):
    """llama-server will not answer this request, and nothing of an answer has come: it could not
    be reached, or it stopped (or restarted) while the request waited for its first byte. With
    several upstreams, another may take the request."""


@dataclass(frozen=True)
class ServerInfo:
    """What the proxy needs to know about the upstream, read from `/props`."""

    model: str
    n_ctx: int
    total_slots: int
    vision: bool
    identity: str = ""  # the model file, as far as llama-server describes it (fresh_info() only): which saved KV caches fit it


@dataclass(frozen=True)
class SmallAnswer:
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
        self._new_connection = lambda: Connection(host, port, settings.connect_timeout, tls, peer="llama-server")
        self.connections = Connections(self._new_connection)
        self._probe_paths = list(PROBE_PATHS)  # those not found disabled yet
        self._probe_doubt_logged = False
        self._generic_logged = False

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

    def request(self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None) -> SmallAnswer:
        """Send a small request on a connection of its own (closed after: never hold a
        llama-server thread idle, above) and return the answer, whatever its status.

        Raises ApiError(529) when llama-server cannot be reached at all, or does not answer.
        """
        conn = self._new_connection()
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise Unanswered(529, UPSTREAM_DOWN.format(url=self.base, reason=_reason(exc)), retry_after=5) from None
            return self._ask(conn, method, path, json_body, timeout)
        finally:
            conn.close()

    def _ask(self, conn: Connection, method: str, path: str, json_body: Any, timeout: float | None) -> SmallAnswer:
        """`request()` on a connection already open (the caller closes it)."""
        body = None if json_body is None else fastjson.dumps(json_body)
        data = self._request_bytes(method, path, body, "application/json" if body is not None else None, close=True)
        try:
            conn.send(data)
            assert conn.sock is not None
            conn.sock.settimeout(timeout or self.settings.read_timeout)
            answer = Answer(conn, None, head_only=method == "HEAD")
            try:
                return SmallAnswer(answer.status, read_all(answer, _NO_CLIENT))
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
             content_type: str | None = "application/json") -> Answer:
        """Send a generation request and return the response once its headers arrive.

        Raises ApiError(529) if llama-server cannot be reached, ClientDisconnected if the client
        left while we waited (the upstream connection is closed by then). The caller reads the
        body (`stream_chunks`, `stream_lines`) and must `close()` the response.
        """
        request = self._request_bytes(method, path, body, content_type, close=False)
        try:
            return self.connections.send(request, lambda conn: self._answer(conn, watch, method))
        except BROKEN_CONNECTION as exc:
            raise Unanswered(529, UPSTREAM_DOWN.format(url=self.base, reason=_reason(exc)), retry_after=5) from None

    def _answer(self, conn: Connection, watch: ClientWatch, method: str) -> Answer:
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
                        raise Unanswered(529, f"{why} while this request waited for its answer; retry", retry_after=5)
                    next_check = time.monotonic() + STOPPED_CHECK_SECONDS
                if stall is not None:
                    stall.quiet()
            # Was the connect timeout. With a StallWatch, a quiet answer wakes its reader every
            # tick to look at the probe (Answer._recv), and UPSTREAM_READ_TIMEOUT is counted there.
            sock.settimeout(self.settings.read_timeout if stall is None else stall.tick)
            answer = Answer(conn, self.connections, head_only=method == "HEAD", silence=stall)
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

    def send_probe(self, timeout: float) -> Connection | None:
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

    def probe_answered(self, conn: Connection) -> bool | None:
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

    def fresh_info(self) -> ServerInfo:
        """`/props` read now, with the model's identity (`/v1/models`), for a decision a stale copy
        must not make: naming a saved KV cache, or restoring one into a llama-server that may have
        been restarted with another model."""
        info = self._read_props(identity=True)
        self._info, self._info_at = info, time.monotonic()
        return info

    def _refresh(self) -> None:
        try:
            self._info, self._info_at = self._read_props(), time.monotonic()
        except ApiError as exc:
            log.debug("refreshing /props failed, keeping the last copy: %s", exc.message)
        finally:
            self._refreshing.release()

    def _read_props(self, identity: bool = False) -> ServerInfo:
        try:
            props = self.json("GET", "/props", timeout=10)
        except ApiError as exc:
            if exc.status not in (400, 401, 403, 404, 405, 501):
                raise
            return self._generic_info()  # another OpenAI-compatible server: no /props
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
            identity=self._identity(props) if identity else "",
        )

    def _generic_info(self) -> ServerInfo:
        """What an OpenAI-compatible server that is not llama-server tells: its first model's name
        (`/v1/models`). No context size (requests are not clamped to it, and `make env` cannot
        say it), one slot unless UPSTREAM_SLOTS says more."""
        try:
            models = self.json("GET", "/v1/models", timeout=10)
            name = str(((models.get("data") or [{}])[0]).get("id") or "local")
        except (ApiError, AttributeError, IndexError, TypeError):
            name = "local"
        if not self._generic_logged:
            self._generic_logged = True
            log.warning("%s has no /props: treating it as an OpenAI-compatible server that is not llama-server (model %s; "
                        "token counts are estimates, no context size, one slot unless UPSTREAM_SLOTS)", self.base, name)
        return ServerInfo(model=self.settings.upstream_model or name, n_ctx=0, total_slots=1, vision=False,
                          identity=hashlib.blake2b(f"generic:{name}".encode(), digest_size=6).hexdigest())

    def _identity(self, props: dict) -> str:
        """A short hash of what tells one model file from another: its file name and the shape,
        size and type llama-server reports in `/v1/models` (two quantisations or fine-tunes of one
        model differ in at least the name). A KV cache saved under one identity is never loaded
        under another."""
        described: dict[str, Any] = {"path": os.path.basename(str(props.get("model_path") or "")),
                                     "ftype": props.get("model_ftype")}
        try:
            models = self.json("GET", "/v1/models", timeout=10)
            meta = (models.get("data") or [{}])[0].get("meta") or {}
            described.update({k: meta.get(k) for k in ("vocab_type", "n_vocab", "n_ctx_train", "n_embd", "n_params", "size", "ftype")})
        except (ApiError, AttributeError, IndexError, TypeError):
            pass  # not llama-server's answer: the file name alone
        return hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=6).hexdigest()

    def health(self) -> tuple[bool, str]:
        """(reachable and ready, a short reason)."""
        try:
            resp = self.request("GET", "/health", timeout=5)
        except ApiError as exc:
            return False, exc.message
        if resp.status_code == 200:
            return True, "ok"
        return False, f"llama-server /health answered HTTP {resp.status_code}: {resp.text[:200]}"


class Connections(Pool):
    """The pool of connections to llama-server, which also counts, for /metrics, the answers given
    up on because llama-server stopped working on them (StallWatch)."""

    def __init__(self, factory: Callable[[], Connection]):
        # llama-server closes the connection after every streamed answer, whatever its headers say.
        super().__init__(factory, IDLE_REUSE_SECONDS, keep_after_streams=False)
        self.stalls = 0
        self._stalls_lock = threading.Lock()

    def count_stall(self) -> None:
        with self._stalls_lock:
            self.stalls += 1


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
    a timer whatever the main loop does. While bytes flow, only `received()` looks at each chunk:
    the reader calls `quiet()` when its socket has been silent for a tick, or on a ping.
    """

    def __init__(self, upstream: Upstream):
        self._upstream = upstream
        self.limit = upstream.settings.stall_timeout
        self.read_timeout = upstream.settings.read_timeout
        self.every = min(PROBE_SECONDS, self.limit / 4)
        self.tick = min(QUIET_TICK_SECONDS, self.every)
        self.quiet_since: float | None = None  # None while the answer makes progress
        self._probe: Connection | None = None
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
        if probe is not None and (probe.sock is None or readable(probe.sock)):
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

    def received(self, body: bytes) -> None:
        """Body bytes arrived: progress, unless they are only `:` comment frames (pings)."""
        if body[0] == 58 and not body.strip(b":\r\n"):
            self.quiet()
        elif self.quiet_since is not None:
            self.heard()

    def _drop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()

    def close(self) -> None:
        self._drop_probe()


def relay_headers(resp: Answer) -> list[tuple[str, str]]:
    return [(k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE_HEADERS]


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
