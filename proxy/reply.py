"""How an Anthropic answer goes out, whoever made it (the model, an identical request already
running, or the proxy itself): as an SSE stream when the client asked for one, otherwise as one
JSON message. A failure after the answer has started becomes the error the client is shown.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

from flask import Response

from . import fastjson, sse, translate
from .disconnect import client_leaving
from .errors import ApiError, from_upstream

log = logging.getLogger("llamabridge.messages")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# At most this long between two frames to a waiting client (Claude Code aborts after 300 s).
PING_SECONDS = 5.0

BROKE_MESSAGE = "the connection to llama-server broke mid-response"

EventStream = Iterator[tuple[str, dict]]


def error_for(exc: BaseException) -> ApiError:
    """The client-facing error for something that went wrong once the answer had started."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, translate.UpstreamStreamError):
        code = exc.error.get("code")
        status = code if isinstance(code, int) else 500
        return from_upstream(status, json.dumps({"error": exc.error}))
    log.warning("upstream stream broke: %r", exc)
    return ApiError(502, f"{BROKE_MESSAGE}: {type(exc).__name__}")


def _sse(events: EventStream) -> Iterator[bytes]:
    """Encode events, keeping at most one ping per PING_SECONDS."""
    last = time.monotonic()
    for event, data in events:
        now = time.monotonic()
        if event == "ping" and now - last < PING_SECONDS:
            continue
        last = now
        yield sse.encode(event, data)


def respond(body: dict, events: EventStream) -> Response:
    """The response for `events`: streamed as they come, or collected into one message."""
    if body.get("stream") is True:
        return Response(_sse(events), mimetype="text/event-stream", headers=SSE_HEADERS)
    answer = fastjson.dumps(translate.collect_message(events))  # stops at message_stop

    def close_events() -> None:
        close = getattr(events, "close", None)
        if close is not None:
            close()

    def answer_then_finish() -> Iterator[bytes]:
        # The client has its whole answer with the first write (Content-Length, no chunked
        # end marker); the generation's end (slot back, prompt-cache check, request log) runs
        # after it instead of in front of it, or at once if the client left before it had the answer.
        with client_leaving(closed=close_events):
            yield answer
        for _ in events:
            pass

    return Response(answer_then_finish(), mimetype="application/json", headers={"Content-Length": str(len(answer))})
