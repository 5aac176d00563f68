"""Talking to llama-server: kept-alive connections reused when sound and replaced when the server
closed them, and its `/props` kept fresh without a request ever waiting for it.

The fake servers here exist for what the real llama-server cannot be made to do on cue: close a
kept-alive connection at the exact moment the next request arrives on it (the race between its
idle timer and our reuse), or change and stall its `/props`. Reuse itself is tested against the
real llama-server in test_proxy_llama.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from proxy.config import Settings
from proxy.disconnect import ClientWatch
from proxy.errors import ApiError
from proxy.http1 import BROKEN_CONNECTION, read_all, stream_chunks
from proxy.upstream import Upstream
from tests.support.local_http import LocalServer, QuietHandler

ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class FakeServer:
    """A listener on a free loopback port; each accepted connection is served by `_connection`
    on a thread of its own."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        raise NotImplementedError


class ClosingServer(FakeServer):
    """Answers the first request on each connection, then closes the connection without answering
    the second request sent on it (a keep-alive connection the server timed out as we sent)."""

    def __init__(self) -> None:
        self.requests = 0
        super().__init__()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            for answered in (True, False):
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                self.requests += 1
                if answered:
                    conn.sendall(ANSWER)


def _length(request: bytes) -> int:
    """The Content-Length of a request's head (0 without one)."""
    for line in request.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class EndlessStream(FakeServer):
    """Streams one chunk of an answer that never ends, and notes when the client hangs up."""

    def __init__(self) -> None:
        self.hung_up = threading.Event()
        super().__init__()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"c\r\ndata: token\n\r\n")
            while conn.recv(65536):
                pass
            self.hung_up.set()


class RestartedWhileLoading(FakeServer):
    """The moment after a fast restart: the generation request this connection carried is never
    answered (the old llama-server's), and `/health` on a new connection answers as a new
    llama-server does while it loads its model. The real one is too quick to load the tiny
    model to be caught in that state (test_llama_restart.py covers a stop)."""

    health = (b"503 Service Unavailable", b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')

    def __init__(self) -> None:
        self.health_checks = 0
        super().__init__()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            data = conn.recv(65536)
            if data.startswith(b"GET /health "):
                self.health_checks += 1
                status, body = self.health
                conn.sendall(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(body), body))
                return
            while conn.recv(65536):
                pass


class BusyPrefilling(RestartedWhileLoading):
    """A llama-server alive and busy: the answer is slow, and `/health` says ok."""

    health = (b"200 OK", b'{"status":"ok"}')


def test_a_request_whose_llama_server_was_restarted_under_it_fails_instead_of_waiting():
    with RestartedWhileLoading() as server:
        upstream = Upstream(Settings(llama_url=server.url, read_timeout=120))
        with pytest.raises(ApiError) as err:
            upstream.open("POST", "/v1/chat/completions", b'{"prompt":"x"}', ClientWatch({}))
    assert err.value.status == 529 and err.value.retry_after == 5
    assert "was restarted (a new one is loading its model) while this request waited" in err.value.message


def test_a_busy_llama_server_is_not_taken_for_a_stopped_one():
    with BusyPrefilling() as server:
        upstream = Upstream(Settings(llama_url=server.url, read_timeout=3))
        with pytest.raises(ApiError) as err:
            upstream.open("POST", "/v1/chat/completions", b'{"prompt":"x"}', ClientWatch({}))
    assert err.value.status == 504 and "UPSTREAM_READ_TIMEOUT" in err.value.message
    assert server.health_checks >= 1


def call(upstream: Upstream) -> bytes:
    answer = upstream.open("POST", "/v1/chat/completions", b'{"prompt":"x"}', ClientWatch({}))
    try:
        assert answer.status == 200
        return read_all(answer, ClientWatch({}))
    finally:
        answer.close()


def test_a_connection_closed_as_we_send_is_replaced_once():
    with ClosingServer() as server:
        upstream = Upstream(Settings(llama_url=server.url))
        assert call(upstream) == b'{"ok":true}'
        assert upstream.connections.opened == 1
        # The kept connection is reused, the server drops it on receipt, the request goes again
        # on a new connection, and the client sees only the answer.
        assert call(upstream) == b'{"ok":true}'
        assert upstream.connections.opened == 2
        assert server.accepted == 2 and server.requests == 3


def test_small_calls_never_reuse_a_connection_the_server_keeps_open():
    """We ask every small call's connection to close after it; a server may answer without saying
    it will (Python's http.server does), keep the connection a moment longer, and close it when
    the next request arrives on it. Taken up again, that connection failed the next call as
    "llama-server is unreachable"."""
    with ClosingServer() as server:
        upstream = Upstream(Settings(llama_url=server.url))
        assert upstream.json("GET", "/props") == {"ok": True}
        assert upstream.json("POST", "/tokenize", {"content": "x"}) == {"ok": True}
        assert server.accepted == 2 and server.requests == 2


def test_an_unfinished_answer_never_leaves_its_connection_for_reuse():
    with ClosingServer() as server:
        upstream = Upstream(Settings(llama_url=server.url))
        answer = upstream.open("POST", "/v1/chat/completions", b'{"prompt":"x"}', ClientWatch({}))
        answer.close()  # closed without reading the body, as when a client leaves mid-answer
        assert call(upstream) == b'{"ok":true}'
        assert upstream.connections.opened == 2 and server.accepted == 2


def test_a_stream_abandoned_midway_hangs_up_on_the_server():
    """What makes llama-server stop generating for a client that left: the connection closes,
    even though the interrupted read has already marked the response itself closed."""
    with EndlessStream() as server:
        upstream = Upstream(Settings(llama_url=server.url))
        answer = upstream.open("POST", "/v1/chat/completions", b"{}", ClientWatch({}))
        chunks = stream_chunks(answer, ClientWatch({}))
        assert next(chunks) == b"data: token\n"
        chunks.close()  # the client went away: the relay's generator is closed mid-read
        answer.close()
        assert server.hung_up.wait(10), "the upstream connection was kept open"


class RawServer(FakeServer):
    """Reads one request per connection and sends `pieces` back as they are, one write each (a
    short pause between them lets each arrive on its own), then closes the connection. For
    framings and faults llama-server does not produce on cue: a body cut short, chunks split
    across writes, a body that ends with the connection, an answer that is not HTTP."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces
        self.requests: list[bytes] = []
        super().__init__()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.requests.append(conn.recv(65536))
            for piece in self.pieces:
                conn.sendall(piece)
                time.sleep(0.01)  # paces the bytes so the reader gets them in separate reads; waits for nothing


def answer_of(server: RawServer, method: str = "POST") -> tuple[Upstream, int, bytes]:
    upstream = Upstream(Settings(llama_url=server.url))
    answer = upstream.open(method, "/v1/chat/completions", b"{}" if method == "POST" else None, ClientWatch({}))
    try:
        return upstream, answer.status, read_all(answer, ClientWatch({}))
    finally:
        answer.close()


def test_a_chunked_answer_split_anywhere_arrives_whole():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"data: one\n\n" * 3
    framed = head + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:20], body[20:])) + b"0\r\n\r\n"
    with RawServer(*(framed[i:i + 5] for i in range(0, len(framed), 5))) as server:
        _, status, got = answer_of(server)
    assert status == 200 and got == body


def test_an_answer_cut_short_is_a_broken_connection_not_a_short_answer():
    with RawServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\"") as server:
        upstream = Upstream(Settings(llama_url=server.url))
        answer = upstream.open("POST", "/v1/chat/completions", b"{}", ClientWatch({}))
        with pytest.raises(BROKEN_CONNECTION):
            read_all(answer, ClientWatch({}))
        answer.close()
        assert not upstream.connections._idle  # never offered to the next request


def test_a_body_without_length_or_chunks_ends_with_the_connection():
    with RawServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"ok":', b"true}") as server:
        _, status, got = answer_of(server)
    assert status == 200 and got == b'{"ok":true}'


def test_the_answer_to_head_has_no_body_whatever_its_length_says():
    with RawServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n") as server:
        upstream, status, got = answer_of(server, "HEAD")
    assert status == 200 and got == b""
    assert server.requests[0].startswith(b"HEAD /v1/chat/completions HTTP/1.1\r\n")
    assert not upstream.connections._idle


def test_an_answer_that_is_not_http_is_reported_as_the_upstream_failing():
    with RawServer(b"SSH-2.0-OpenSSH_9.2\r\n") as server:
        upstream = Upstream(Settings(llama_url=server.url))
        with pytest.raises(ApiError) as failed:
            upstream.open("POST", "/v1/chat/completions", b"{}", ClientWatch({}))
        assert failed.value.status == 529 and server.url in failed.value.message


def test_the_request_carries_host_length_and_the_api_key():
    with RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") as server:
        upstream = Upstream(Settings(llama_url=server.url, llama_api_key="sekrit"))
        answer = upstream.open("POST", "/v1/chat/completions", b'{"a":1}', ClientWatch({}))
        assert read_all(answer, ClientWatch({})) == b"{}"
        answer.close()
        host = server.url.split("//")[1].encode()
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1" and body == b'{"a":1}'
    assert {b"Host: " + host, b"Content-Length: 7", b"Content-Type: application/json",
            b"Authorization: Bearer sekrit"} <= set(lines[1:])


class PropsServer(LocalServer):
    """llama-server's `/props`, with settings the test changes and an answer it can hold back or
    fail: the real llama-server cannot change its settings without a restart, nor stall `/props`
    on cue, and the test is about what the proxy does in the meantime."""

    def __init__(self) -> None:
        self.slots = 1
        self.status = 200
        self.answer = threading.Event()  # cleared: /props waits until it is set
        self.answer.set()
        self.served = 0
        test = self

        class PropsHandler(QuietHandler):
            def do_GET(self) -> None:
                test.answer.wait()
                test.served += 1
                self.send_json(test.status, {"default_generation_settings": {"n_ctx": 4096}, "total_slots": test.slots,
                                             "model_alias": "tiny"})

        super().__init__(PropsHandler)

    def close(self) -> None:
        self.answer.set()
        super().close()


def refreshed(upstream: Upstream) -> None:
    """Wait for the background /props refresh: it holds this lock until it is done."""
    with upstream._refreshing:
        pass


def test_a_request_never_waits_for_props_once_the_proxy_has_a_copy():
    with PropsServer() as server:
        upstream = Upstream(Settings(llama_url=server.url))
        assert upstream.info().total_slots == 1  # the first call has nothing else to go on: it waits
        # llama-server was restarted with two slots, and its /props is slow to answer.
        server.slots = 2
        server.answer.clear()
        # A stale copy is answered at once (waiting would hang here), twice, while one refresh runs.
        assert upstream.info(max_age=0).total_slots == 1
        assert upstream.info(max_age=0).total_slots == 1
        server.answer.set()
        refreshed(upstream)
        assert upstream.info().total_slots == 2
        assert server.served == 2


def test_a_failed_refresh_keeps_the_last_copy_and_is_tried_again():
    with PropsServer() as server:
        upstream = Upstream(Settings(llama_url=server.url))
        assert upstream.info().model == "tiny"
        server.status = 503  # loading a new model
        assert upstream.info(max_age=0).model == "tiny"
        refreshed(upstream)
        assert upstream.info(max_age=0).model == "tiny"
        refreshed(upstream)
        assert server.served == 3
        server.status, server.slots = 200, 4
        upstream.info(max_age=0)
        refreshed(upstream)
        assert upstream.info().total_slots == 4


class PingingButHung(FakeServer):
    """A llama-server whose main loop hangs mid-stream while its HTTP thread still sends SSE
    pings, and so never answers `/slots` (it goes through the main loop's task queue). The real
    one cannot be made to deadlock on cue; SIGSTOP (test_stall.py) stops the pings too."""

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            data = conn.recv(65536)
            if data.startswith(b"GET /slots "):
                while conn.recv(65536):
                    pass
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"c\r\ndata: token\n\r\n")
            try:
                while True:
                    conn.sendall(b"3\r\n:\n\n\r\n")
                    time.sleep(0.2)  # llama-server's ping interval, shortened
            except OSError:
                return


def test_pings_alone_do_not_keep_a_hung_llama_servers_answer_going():
    with PingingButHung() as server:
        upstream = Upstream(Settings(llama_url=server.url, read_timeout=120, stall_timeout=2))
        answer = upstream.open("POST", "/v1/chat/completions", b"{}", ClientWatch({}))
        try:
            with pytest.raises(ApiError) as err:
                read_all(answer, ClientWatch({}))
        finally:
            answer.close()
    assert err.value.status == 529 and "UPSTREAM_STALL_TIMEOUT" in err.value.message
    assert upstream.connections.stalls == 1
