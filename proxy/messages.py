"""The Anthropic routes: `/v1/messages` and `/v1/messages/count_tokens`.

Every request is classified by shape (classify.py) and handled by its class's policy: answered
here (`local`), sent to a second llama-server (`route`), refused while it would evict a
conversation's cache (`shed`), or passed to llama-server through the admission gate. Two ways
to reach llama-server, chosen by `UPSTREAM_API`:
- `openai` (default): llamabridge's own translation to `/v1/chat/completions` (translate.py),
  which covers what llama-server's native Anthropic endpoint gets wrong (adaptive thinking,
  images in tool results, tool results after user text, named tool_choice, pings in prefill).
- `anthropic`: llama-server's native `/v1/messages`, with the same request fixes applied
  (model name mapped, billing header removed) and errors put in Anthropic's envelope.

A streamed request that cannot get a slot within a few seconds is answered at once with
`message_start` and then `ping` every few seconds until it does (clients abort silent
streams); a failure after that point is an `event: error` rather than an HTTP status.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Iterator

from flask import Response

from . import classify, fastjson, local, sse, translate
from .disconnect import ClientDisconnected, ClientWatch
from .errors import ApiError, from_upstream, sse_error
from .flights import Flight
from .generation import BROKEN, UPSTREAM_PING_SECONDS, Generation
from .metrics import Call
from .services import Services, Target
from .tokens import estimate, fit_max_tokens, upper_bound
from .upstream import read_all, relay_headers, stream_chunks

log = logging.getLogger("llamabridge.messages")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How long a streamed request may wait for a slot before we start its stream and ping.
SYNC_WAIT_SECONDS = 3.0
# At most this long between two frames to a waiting client (Claude Code aborts after 300 s).
PING_SECONDS = 5.0

BROKE_MESSAGE = "the connection to llama-server broke mid-response"

EventStream = Iterator[tuple[str, dict]]


def _error_for(exc: BaseException) -> ApiError:
    """The client-facing error for something that went wrong once the answer had started."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, translate.UpstreamStreamError):
        status = exc.error.get("code") if isinstance(exc.error.get("code"), int) else 500
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


def _respond(body: dict, events: EventStream) -> Response:
    if body.get("stream") is True:
        return Response(_sse(events), mimetype="text/event-stream", headers=SSE_HEADERS)
    answer = fastjson.dumps(translate.collect_message(events))  # stops at message_stop

    def answer_then_finish() -> Iterator[bytes]:
        # The client has its whole answer with the first write (Content-Length, no chunked
        # end marker); the generation's end (slot back, prompt-cache check, request log) runs
        # after it instead of in front of it.
        try:
            yield answer
        except GeneratorExit:
            close = getattr(events, "close", None)  # the client left before it had the answer
            if close is not None:
                close()
            raise
        for _ in events:
            pass

    return Response(answer_then_finish(), mimetype="application/json", headers={"Content-Length": str(len(answer))})


# --------------------------------------------------------------------------------------------
# POST /v1/messages


def create_message(body: dict, digest: str, services: Services, watch: ClientWatch, call: Call, native: bool) -> Response:
    call.klass = classify.classify(body, claude_code=call.session is not None)
    policy = services.settings.policy(call.klass)
    if policy == "local":
        return _local_reply(body, services, call)
    target = services.main
    if policy == "route":
        assert services.background is not None  # config.from_env guarantees it
        target = services.background
        call.handled = "background"
    info = target.info(services.settings.upstream_slots)
    if policy == "shed" and not target.gate.has_cold_free_slot():
        call.handled = "shed"
        raise ApiError(529, f"{call.klass} request not run: every llama-server slot holds a conversation's prompt cache "
                            f"(POLICY_{call.klass.upper()}=shed; set BACKGROUND_URL to run these on a second server)", retry_after=60)
    if native:
        return _passthrough(body, target, services, watch, call)

    request = translate.anthropic_to_openai(body, translate.Options(model=info.model, vision=info.vision))
    request["sse_ping_interval"] = UPSTREAM_PING_SECONDS
    tokens = None
    render = translate.render_request(request)
    tracked = call.session is not None and call.klass in (classify.MAIN, classify.SUBAGENT)
    if info.n_ctx > 0 and (tracked or upper_bound(render) + request["max_tokens"] > info.n_ctx):
        # Exact tokens: to clamp max_tokens to the context, and (for a Claude Code session's
        # conversation turns) to check the prompt cache afterwards. A request that obviously
        # fits and is not tracked skips the two extra calls.
        tokens = target.counter.tokens(render)
        if tokens is not None:
            request["max_tokens"] = fit_max_tokens(len(tokens), request["max_tokens"], info.n_ctx, services.settings.min_output_tokens)

    key = (call.session, digest) if call.session else None
    flight, leader = services.flights.join(key) if key else (None, True)
    if not leader:
        assert flight is not None
        return _follow(body, flight, watch, call, services)
    gen = Generation(services, target, call, watch, "/v1/chat/completions", request, tokens)
    queued = False
    try:
        with gen.starting():
            gen.enqueue()
            if body.get("stream") is True and not gen.wait(SYNC_WAIT_SECONDS):
                queued = True  # answer now, ping while waiting (in _led)
            else:
                gen.wait_until_admitted()  # at once if the wait above already admitted it
                gen.open()
    except BaseException:
        if flight is not None:
            services.flights.finish(key, flight, None)
        raise
    return _respond(body, _led(gen, body, flight, key, services, queued=queued))


def _finish(gen: Generation, flight: Flight | None, key, services: Services, events: list | None) -> None:
    gen.close()
    if flight is not None:
        services.flights.finish(key, flight, events)


def _led(gen: Generation, body: dict, flight: Flight | None, key, services: Services, queued: bool) -> EventStream:
    """The events of a generation this request runs itself; a queued one pings until admitted."""
    recorded: list[tuple[str, dict]] = []
    try:
        if queued:
            start = translate.message_start(body["model"])
            recorded.append(start)
            yield start
            while not gen.wait(PING_SECONDS):
                gen.watch.check()
                yield "ping", {"type": "ping"}
            gen.open()
        for event, data in gen.anthropic_events(body["model"], skip_start=queued):
            if event != "ping":
                recorded.append((event, data))
            yield event, data
    except ClientDisconnected:
        gen.client_left = True
    except GeneratorExit:
        gen.client_left = True  # the server could not write to the client
        raise
    except (ApiError, translate.UpstreamStreamError, *BROKEN) as exc:
        err = _error_for(exc)
        gen.fail(err)
        if body.get("stream") is not True:
            raise err from None
        yield "error", sse_error(err)
    finally:
        _finish(gen, flight, key, services, recorded if gen.completed else None)


def _follow(body: dict, flight: Flight, watch: ClientWatch, call: Call, services: Services) -> Response:
    """An identical request from the same session is already running: wait for its answer."""
    call.handled = "deduplicated"

    def events() -> EventStream:
        try:
            while not flight.done.wait(PING_SECONDS if body.get("stream") is True else 0.25):
                watch.check()
                if body.get("stream") is True:
                    yield "ping", {"type": "ping"}
            if flight.result is None:
                raise ApiError(529, "the identical request this one repeats did not finish; retry", retry_after=1)
            for event, data in flight.result:
                if event == "message_delta":
                    call.usage(data.get("usage"))
                yield event, data
        except ClientDisconnected:
            call.status = 499
        except ApiError as err:
            call.status, call.error = err.status, err.message
            if body.get("stream") is not True:
                raise
            yield "error", sse_error(err)
        finally:
            services.metrics.record(call)

    return _respond(body, events())


def _local_reply(body: dict, services: Services, call: Call) -> Response:
    """A title or a token-count probe, answered without the model.

    A probe exists to learn the request's token count, so it gets the exact one (tokenizing
    uses no slot). A title's usage matters to nobody: it gets the estimate, and no call to
    llama-server at all, so it comes back at once even when llama-server is busy or down.
    """
    call.handled = "local"
    render = translate.count_tokens_request(body)
    if call.klass == classify.PROBE:
        count, _ = services.main.counter.count(render)
        text, output_tokens, stop = "", 1, "max_tokens"
    else:
        count = estimate(render)
        text = local.title_text(body)
        output_tokens, stop = max(1, len(text) // 4), "end_turn"
    call.usage({"input_tokens": count, "output_tokens": output_tokens})
    services.metrics.record(call)
    return _respond(body, iter(local.events(body, text, count, output_tokens, stop)))


# --------------------------------------------------------------------------------------------
# POST /v1/messages/count_tokens


def count_tokens(body: dict, services: Services, native: bool, call: Call) -> Response:
    """The exact number of prompt tokens `/v1/messages` would send for this request.

    Renders our translation with llama-server's own chat template and tokenizer: no slot is
    used, so this never waits behind a generation. `X-Llamabridge-Token-Count` says `exact`,
    or `estimate` when the upstream cannot render templates.
    """
    target = services.main
    info = target.upstream.info()
    if native:
        raw = target.upstream.json("POST", "/v1/messages/count_tokens", _native_body(body, info.model), timeout=60)
        count, exact = int(raw.get("input_tokens") or 0), True
    else:
        count, exact = target.counter.count(translate.count_tokens_request(body, translate.Options(vision=info.vision)))
    services.metrics.token_counts.labels("exact" if exact else "estimate").inc()
    call.klass, call.handled = "count_tokens", "local"
    call.usage({"input_tokens": count})
    services.metrics.record(call)
    resp = Response(json.dumps({"input_tokens": count}), mimetype="application/json")
    resp.headers["X-Llamabridge-Token-Count"] = "exact" if exact else "estimate"
    return resp


# --------------------------------------------------------------------------------------------
# Native passthrough (UPSTREAM_API=anthropic)


def _native_body(body: dict, model: str) -> dict:
    out = dict(body)
    out["model"] = model
    if out.get("system") is not None:
        # Same cache fix as the translation: drop the per-session billing header.
        text = translate.system_text(out["system"])
        out["system"] = text
        if not text:
            out.pop("system")
    return out


def _with_model(raw: bytes, model: str) -> bytes:
    """A JSON message (or a `message_start` event's data) with `model` set to the client's name."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(obj, dict):
        return raw
    target = obj.get("message") if obj.get("type") == "message_start" else obj
    if isinstance(target, dict) and "model" in target:
        target["model"] = model
        return json.dumps(obj, ensure_ascii=False).encode()
    return raw


def _rename_first_event(chunks: Iterator[bytes], model: str) -> Iterator[bytes]:
    """Pass an Anthropic SSE stream through, rewriting the model name in its first frame
    (`message_start`) only; every later byte goes out as it arrives."""
    head = b""
    for chunk in chunks:
        head += chunk
        end = head.find(b"\n\n")
        if end < 0:
            continue
        frame, rest = head[: end + 2], head[end + 2:]
        lines = frame.split(b"\n")
        yield b"\n".join(b"data: " + _with_model(line[5:].strip(), model) if line.startswith(b"data:") else line for line in lines)
        if rest:
            yield rest
        break
    else:
        if head:
            yield head
        return
    yield from chunks


def _passthrough(body: dict, target: Target, services: Services, watch: ClientWatch, call: Call) -> Response:
    """llama-server's native /v1/messages, admitted through the same gate (waiting without pings)."""
    gen = Generation(services, target, call, watch, "/v1/messages", _native_body(body, target.upstream.info().model))
    stream = body.get("stream") is True
    try:
        with gen.starting():
            gen.enqueue()
            gen.wait_until_admitted()
            answer = gen.open()
            if not stream:
                raw = read_all(answer, watch)
                gen.completed = True
    except BROKEN as exc:
        raise _error_for(exc) from None
    if not stream:
        try:
            call.usage(json.loads(raw).get("usage"))
        except (ValueError, AttributeError):
            pass  # not a message: relayed as it is, without usage in the log
        gen.close()
        return Response(_with_model(raw, body["model"]), status=answer.status, mimetype="application/json")

    def broken(exc: BaseException) -> Iterator[bytes]:
        yield sse.encode("error", sse_error(_error_for(exc)))

    chunks = _rename_first_event(stream_chunks(answer, watch), body["model"])
    return Response(gen.relay(chunks, broken), status=answer.status, headers=relay_headers(answer))
