"""Raw requests a test can abandon at any moment, and a slot held busy on cue: a streamed
generation that runs far longer than the test needs it, until the test hangs up."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

# Forced by its grammar to about 4,000 tokens (about 20 s on the tiny model with -t 1).
LONG_CHAT = {"model": "m", "max_tokens": 8000, "stream": True, "messages": [{"role": "user", "content": "digits"}],
             "response_format": {"type": "json_schema", "json_schema": {"name": "digits", "schema": {
                 "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2000}}}}


def raw_post(base_url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> socket.socket:
    """A POST sent over a plain socket, which the test can close whenever it likes, the way a
    killed client or a closed editor tab leaves."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@contextlib.contextmanager
def holding_the_slot(base_url: str, headers: dict[str, str] | None = None) -> Iterator[None]:
    """A long streamed chat completion through the proxy, generating (its first tokens read)
    for as long as the block runs; leaving it hangs up, and the proxy frees the slot."""
    with raw_post(base_url, "/v1/chat/completions", LONG_CHAT, headers) as sock:
        seen = b""
        while seen.count(b"data: ") < 2:
            data = sock.recv(65536)
            assert data, f"the long generation ended before it started: {seen[-500:]!r}"
            seen += data
        assert b" 200 " in seen.split(b"\r\n", 1)[0], seen[:500]
        yield
