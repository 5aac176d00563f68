"""Notice a client that went away, so its upstream request can be closed at once.

A streamed response notices on its next write, but nothing is written while llama-server is
prefilling a long prompt or while a non-streamed reply is being generated. The proxy asks
llama-server for SSE pings on every streamed upstream request, and at every upstream line
(token or ping) looks at the client's socket: readable with nothing to read means the peer
closed it. Closing our upstream connection is what makes llama-server stop and free the slot.
`client_leaving` is where every response body handles a client that went away, however it was
noticed.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# How often check() looks at the socket: a system call per streamed token adds up, and a client
# that left is still noticed within a tenth of a second.
CHECK_INTERVAL = 0.05


class ClientDisconnected(Exception):
    """The client closed its connection; stop work on its behalf."""


class ClientWatch:
    def __init__(self, environ: dict[str, Any]):
        # gunicorn's workers put the client socket in the WSGI environ; other servers
        # (the Flask test client) do not, and then only failed writes reveal a disconnect.
        self._sock: socket.socket | None = environ.get("gunicorn.socket")
        self._poller: select.poll | None = None
        self._checked = float("-inf")

    def gone(self) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            # poll(), not select(): select() cannot watch a descriptor numbered 1024 or above
            # (ValueError), and a busy proxy's client sockets get there.
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(sock, select.POLLIN)
            if not self._poller.poll(0):
                return False
            # Peek so a pipelined next request (keep-alive) is left for the server to read.
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def check(self) -> None:
        """Raise ClientDisconnected if the client has gone (looked at most every CHECK_INTERVAL)."""
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        if self.gone():
            raise ClientDisconnected()


@contextmanager
def client_leaving(left: Callable[[], None] | None = None, closed: Callable[[], None] | None = None) -> Iterator[None]:
    """Around the part of a response body that writes to the client: the one place that handles
    the client going away.

    Noticed by ClientWatch (ClientDisconnected), `left()` runs and the body ends quietly after the
    `with` block. Noticed by the server because a write failed (a broken pipe), the body's
    generator is closed (GeneratorExit): `closed()` runs (`left()` unless given) and the exit goes
    on, since a closing generator may not yield again. Anything else raised is the caller's.
    """
    try:
        yield
    except ClientDisconnected:
        if left is not None:
            left()
    except GeneratorExit:
        then = closed or left
        if then is not None:
            then()
        raise
