"""Sockets numbered 1024 and above, which a busy proxy's threads reach (one client socket, one
llama-server connection and a probe each, plus the request log and whatever else is open).

`select.select` cannot watch such a descriptor (it raises ValueError), which once made the
client watch take every such client for one that had left, and the wait for llama-server's
answer fail. Everything that waits on a socket uses `poll` instead.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from proxy.config import Settings
from proxy.disconnect import ClientWatch
from proxy.http1 import read_all
from proxy.upstream import Upstream

HIGH = 1024


@contextmanager
def low_descriptors_taken() -> Iterator[None]:
    """Every descriptor below HIGH in use (by copies of stdin), so the next socket gets a high one;
    the copies are closed and the limit restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * HIGH:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2 * HIGH, hard), hard))
    taken: list[int] = []
    try:
        while True:
            fd = os.dup(0)
            taken.append(fd)
            if fd >= HIGH - 1:
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_on_a_descriptor_above_1023_is_watched_not_taken_for_gone():
    with low_descriptors_taken():
        ours, peer = socket.socketpair()
    try:
        assert ours.fileno() >= HIGH and peer.fileno() >= HIGH
        watch = ClientWatch({"gunicorn.socket": ours})
        assert watch.gone() is False
        peer.close()
        assert watch.gone() is True
    finally:
        ours.close()
        peer.close()


@pytest.mark.integration
def test_a_generation_on_a_descriptor_above_1023_is_answered(llama):
    """Waiting for llama-server's answer, and taking an idle connection for the next request, on
    connections numbered above 1023 (the real llama-server)."""
    upstream = Upstream(Settings(llama_url=llama.url))
    body = b'{"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}'
    with low_descriptors_taken():
        answer = upstream.open("POST", "/v1/chat/completions", body, ClientWatch({}))
        try:
            assert answer.status == 200
            assert b'"choices"' in read_all(answer, ClientWatch({}))
        finally:
            answer.close()
        # llama-server keeps the connection of a non-streamed answer: it is idle, not closed.
        conn, reused = upstream.connections.get()
    try:
        assert conn.sock is not None and conn.sock.fileno() >= HIGH
        assert reused
    finally:
        conn.close()
