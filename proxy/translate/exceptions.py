"""What the translation raises, for callers to catch: a bad client request, a malformed upstream
stream, and an error llama-server reported mid-stream."""

from __future__ import annotations

from typing import Any


class InvalidRequest(ValueError):
    """The client sent something that is not a valid request; the message says what and where."""


class StreamProtocolError(ValueError):
    """The upstream stream is not what an OpenAI-compatible server sends (raised while decoding
    its frames, in proxy/sse.py, and while translating them, in stream.py)."""


class UpstreamStreamError(Exception):
    """llama-server reported an error inside an already-started stream."""

    def __init__(self, error: dict):
        super().__init__(str(error.get("message") or error))
        self.error = error


def json_type(value: Any) -> str:
    """How an error message names a JSON value's type ("an object", "null")."""
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
