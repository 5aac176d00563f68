"""The translated path (`UPSTREAM_API=openai`, the default): an Anthropic request sent to
llama-server's `/v1/chat/completions` (translate.py) and its answer turned back into Anthropic
events.

A streamed request that cannot get a slot within a few seconds is answered at once with
`message_start` and then `ping` every few seconds until it does (clients abort silent
streams); a failure after that point is an `event: error` rather than an HTTP status. The
events of a completed answer are handed to the identical requests that waited for it
(followers.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable

from flask import Response

from . import classify, translate
from .disconnect import ClientWatch, client_leaving
from .errors import ApiError, sse_error
from .flights import Flight
from .generation import BROKEN, UPSTREAM_PING_SECONDS, Generation
from .metrics import Call
from .reply import PING_SECONDS, EventStream, error_for, respond
from .services import Services, Target
from .tokens import fit_max_tokens, upper_bound
from .upstream import ServerInfo

# How long a streamed request may wait for a slot before we start its stream and ping.
SYNC_WAIT_SECONDS = 3.0


def prepare(body: dict, target: Target, info: ServerInfo, services: Services, call: Call) -> tuple[dict, array | None]:
    """The OpenAI request for `body`, and its exact prompt tokens when they were counted."""
    request = translate.anthropic_to_openai(body, translate.Options(model=info.model, vision=info.vision))
    request["sse_ping_interval"] = UPSTREAM_PING_SECONDS
    tokens = None
    render = translate.render_request(request)
    tracked = call.session is not None and call.klass in (classify.MAIN, classify.SUBAGENT)
    if info.n_ctx > 0 and (tracked or upper_bound(render) + request["max_tokens"] > info.n_ctx):
        # Exact tokens: to clamp max_tokens to the context, and (for a Claude Code session's
        # conversation turns) to check the prompt cache afterwards. A request that obviously
        # fits and is not tracked skips the two extra calls.
        tokens = target.counted(lambda counter: counter.tokens(render))
        if tokens is not None:
            request["max_tokens"] = fit_max_tokens(len(tokens), request["max_tokens"], info.n_ctx, services.settings.min_output_tokens)
    return request, tokens


def lead(body: dict, request: dict, tokens: array | None, target: Target, services: Services, watch: ClientWatch,
         call: Call, flight: Flight | None, key: Hashable) -> Response:
    """Run the generation; its events also go to `flight`'s followers once it completes."""
    gen = Generation(services, target, call, watch, "/v1/chat/completions", request, tokens)
    queued = False
    try:
        with gen.starting():
            gen.enqueue()
            if body.get("stream") is True and not gen.wait(SYNC_WAIT_SECONDS):
                queued = True  # answer now, ping while waiting (in _events)
            else:
                gen.wait_until_admitted()  # at once if the wait above already admitted it
                gen.open()
    except BaseException:
        if flight is not None:
            services.flights.finish(key, flight, None)
        raise
    return respond(body, _events(gen, body, flight, key, services, queued=queued))


def _finish(gen: Generation, flight: Flight | None, key: Hashable, services: Services, events: list | None) -> None:
    gen.close()
    if flight is not None:
        services.flights.finish(key, flight, events)


def _events(gen: Generation, body: dict, flight: Flight | None, key: Hashable, services: Services, queued: bool) -> EventStream:
    """The events of the generation; a queued one pings until admitted."""
    recorded: list[tuple[str, dict]] = []
    try:
        with client_leaving(gen.client_gone):
            if queued:
                start = translate.message_start(body["model"])
                recorded.append(start)
                yield start
                while not gen.wait(PING_SECONDS):
                    gen.watch.check()
                    yield "ping", {"type": "ping"}
                gen.open()
            started = queued  # message_start has gone to the client
            while True:
                answered = False  # something past message_start has
                try:
                    for event, data in gen.anthropic_events(body["model"], skip_start=started):
                        if event == "message_start":
                            started = True
                        elif event != "ping":
                            answered = True
                        if event != "ping":
                            recorded.append((event, data))
                        yield event, data
                    break
                except BROKEN as exc:
                    # llama-server stopped before its first token: with another upstream up, the
                    # turn goes there, and the client sees one answer.
                    if answered or not gen.start_over(exc):
                        raise
    except (ApiError, translate.UpstreamStreamError, *BROKEN) as exc:
        err = error_for(exc)
        gen.fail(err)
        if body.get("stream") is not True:
            raise err from None
        yield "error", sse_error(err)
    finally:
        _finish(gen, flight, key, services, recorded if gen.completed else None)
