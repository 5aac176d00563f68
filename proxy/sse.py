"""Server-sent events: encode Anthropic frames, decode llama-server's OpenAI `data:` frames."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from . import fastjson
from .translate import (
    StreamProtocolError,  # defined with the translation, which stays free of I/O modules
)


def encode(event: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE frame. Claude Code ignores frames without an `event:` line."""
    return b"event: " + event.encode() + b"\ndata: " + fastjson.dumps(data) + b"\n\n"


# Yielded by decode_openai(keepalive=True) for each comment line (llama-server's `: ping`).
KEEPALIVE: dict[str, Any] = {"keepalive": True}


def decode_openai(lines: Iterable[bytes], keepalive: bool = False) -> Iterator[dict[str, Any]]:
    """Yield each JSON payload of an OpenAI-style SSE stream, stopping at `data: [DONE]`.

    `lines` are raw lines without their newline. Comment lines (`: ping`) yield KEEPALIVE if
    `keepalive` is set, and are skipped otherwise; other fields are skipped. A payload that is
    not a JSON object raises StreamProtocolError so the caller can end the client's stream
    with an error event.
    """
    data: list[bytes] = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if data:
                payload = b"\n".join(data)
                data = []
                if payload.strip() == b"[DONE]":
                    return
                yield _parse(payload)
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif keepalive and line.startswith(b":"):
            yield KEEPALIVE
        # "event:", "id:", "retry:" and ":" comment lines carry nothing we use.
    if data:
        payload = b"\n".join(data)
        if payload.strip() != b"[DONE]":
            yield _parse(payload)


def _parse(payload: bytes) -> dict[str, Any]:
    try:
        obj = fastjson.loads(payload)
    except ValueError as exc:
        raise StreamProtocolError(f"upstream sent a stream frame that is not JSON: {payload[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise StreamProtocolError(f"upstream sent a stream frame that is not an object: {payload[:200]!r}")
    return obj
