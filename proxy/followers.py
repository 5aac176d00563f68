"""Followers: a Claude Code session that sends a turn again while its first copy is still being
generated (a client retry) waits for that generation and gets its events, instead of running
the same prompt a second time (keyed by session and body digest; flights.py).
"""

from __future__ import annotations

from flask import Response

from .disconnect import ClientWatch, client_leaving
from .errors import ApiError, sse_error
from .flights import Flight
from .metrics import Call
from .reply import PING_SECONDS, EventStream, respond
from .services import Services


def follow(body: dict, flight: Flight, watch: ClientWatch, call: Call, services: Services) -> Response:
    """An identical request from the same session is already running: wait for its answer."""
    call.handled = "deduplicated"
    stream = body.get("stream") is True

    def left() -> None:
        call.status = 499

    def events() -> EventStream:
        try:
            # Only a disconnect the watch noticed is recorded as 499 here; after a failed write
            # the status stays as it was.
            with client_leaving(left, closed=lambda: None):
                while not flight.done.wait(PING_SECONDS if stream else 0.25):
                    watch.check()
                    if stream:
                        yield "ping", {"type": "ping"}
                if flight.result is None:
                    raise ApiError(529, "the identical request this one repeats did not finish; retry", retry_after=1)
                for event, data in flight.result:
                    if event == "message_delta":
                        call.usage(data.get("usage"))
                    yield event, data
        except ApiError as err:
            call.status, call.error = err.status, err.message
            if not stream:
                raise
            yield "error", sse_error(err)
        finally:
            services.metrics.record(call)

    return respond(body, events())
