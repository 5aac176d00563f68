"""OpenAI routes, relayed to llama-server as they are and streamed without buffering.

Cline, Continue, Aider, OpenCode, Cursor and the OpenAI SDKs already speak llama-server's dialect, and
so do the clients of its other generation routes: the Responses API (the OpenAI SDK's
`responses.create`, Codex CLI, the OpenAI Agents SDK) and llama-server's native `/completion`
and `/infill` (Continue's llama.cpp provider, llama.vscode's code completion). The proxy adds
one port for every agent, the admission gate (generation requests wait for a slot
with Claude Code's, at interactive priority), uniform errors when llama-server is down, and
closing the upstream request the moment the client leaves. The one change to a body: with
more than one slot, `id_slot` names the slot the gate admitted it to. The one change to an
answer: a 500 that llama-server sends for a bad request (malformed messages or tools, an image
for a model without a projector) becomes the 400 it is (errors.from_upstream), so clients
report it instead of retrying.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator

from flask import Response

from . import classify, fastjson, translate
from .disconnect import ClientWatch, client_leaving
from .errors import ApiError, from_upstream, openai_stream_error
from .generation import Generation
from .http1 import BROKEN_CONNECTION, read_all, stream_chunks
from .metrics import Call
from .services import Services
from .upstream import relay_headers

log = logging.getLogger("llamabridge.relay")

# Routes that run a generation on a slot, and so go through the gate: a client that reached
# llama-server some other way would take the slot from under a Claude Code turn, or wait in
# llama-server's own queue where no priority applies. llama-server reads `id_slot` on all of
# them (the Responses API's body is converted to a chat completion with every other field kept).
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/completion", "/infill")


def relay(method: str, path: str, parsed: dict | None, raw_body: bytes | None, content_type: str | None,
          services: Services, watch: ClientWatch, call: Call) -> Response:
    if path not in GENERATION_ROUTES or parsed is None or raw_body is None:
        return _plain(method, path, raw_body, content_type, services, watch)
    status, headers, body = generation(path, parsed, raw_body, services, watch, call)
    return Response(body, status=status, headers=headers)


def generation(path: str, parsed: dict, raw_body: bytes, services: Services, watch: ClientWatch,
               call: Call) -> tuple[int, list[tuple[str, str]], Iterator[bytes]]:
    """A completion through the gate: llama-server's status, headers and body (an iterator that
    gives the slot back and records the request however it ends). Before the answer starts, a
    failure raises (ApiError, ClientDisconnected) with the generation already closed."""
    target = services.main
    call.klass = classify.OPENAI
    target.info(services.settings.upstream_slots)
    gen = Generation(services, target, call, watch, path, parsed)
    with gen.starting():
        gen.enqueue()
        gen.wait_until_admitted()
        answer = gen.open(raw_body, any_status=True)
        chunks = _started_once(gen, stream_chunks(answer, watch), watch)
        if answer.status == 500:  # a short JSON error: read it to see whose fault it is
            raw = read_all(answer, watch)
            if (err := from_upstream(answer.status, raw)).status == 400:
                raise err
            chunks = iter((raw,))
    call.status = answer.status

    def broken(exc: BaseException) -> Iterator[bytes]:
        # Headers are sent; all we can do is end the body early and say why in the log.
        if isinstance(exc, ApiError):
            # The request was given up on (upstream.StallWatch has logged why). A stream ends
            # the way llama-server ends one on an error of its own, with an error frame that
            # the OpenAI SDKs raise; by then every byte it sent has been relayed, so the frame
            # starts on an event boundary.
            if answer.content_type == "text/event-stream":
                return iter((b"data: " + fastjson.dumps(openai_stream_error(exc)) + b"\n\n",))
            return iter(())
        log.warning("upstream connection broke while relaying %s: %s", path, exc)
        call.error = f"upstream broke: {type(exc).__name__}"
        return iter(())

    chunks = _noting_usage(chunks, call)
    headers = relay_headers(answer)
    length = answer.headers.get("Content-Length")
    if length is not None:
        # The bytes are relayed untouched, so llama-server's length holds: the client gets a plain
        # body instead of chunked framing (fewer writes on every non-streamed answer).
        headers.append(("Content-Length", length))
    return answer.status, headers, gen.relay(chunks, broken)


# The two objects the request log's usage comes from, found by their keys near the end of an
# answer (a JSON string cannot hold `"timings":` unescaped, so a match is the real key), then
# parsed as JSON. Parsing the whole answer instead would mean keeping all of it, which the relay
# never does, and a parse of every large answer on the hot path. Flat `timings`; `usage` holds
# one level of details.
_TIMINGS = re.compile(rb'"timings":\s*(\{[^{}]*\})')
_USAGE = re.compile(rb'"usage":\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


def _noting_usage(chunks: Iterator[bytes], call: Call, keep: int = 16384) -> Iterator[bytes]:
    """Relay bytes untouched, then read the usage for the request log from the tail of the
    answer. llama-server ends every answer with it: `timings` at the end of a JSON body or in a
    stream's last chunks, or only `usage` in a non-streamed Responses answer. The object is
    found by its key rather than by parsing the whole last line, which can be larger than the
    tail kept (a Responses stream's last event repeats the whole reply)."""
    tail: deque[bytes] = deque()  # the last chunks, at least `keep` bytes of them
    size = 0
    for chunk in chunks:
        tail.append(chunk)
        size += len(chunk)
        while size - len(tail[0]) >= keep:
            size -= len(tail.popleft())
        yield chunk
    end = b"".join(tail)
    for name, pattern in (("timings", _TIMINGS), ("usage", _USAGE)):
        at = end.rfind(b'"%s":' % name.encode())
        found = pattern.match(end, at) if at >= 0 else None
        if found is None:
            continue
        try:
            value = fastjson.loads(found.group(1))
        except ValueError:
            continue
        if (usage := translate.usage_from({name: value})) is not None:
            call.usage(usage)
            return


def _started_once(gen: Generation, chunks: Iterator[bytes], watch: ClientWatch) -> Iterator[bytes]:
    """The answer's bytes; if its connection breaks before the first of them, the request is
    sent again on another upstream (if one is in the rotation) and that one's bytes follow.
    llama-server sends a stream's headers before its prompt is evaluated, so a server that dies
    during the prefill has answered nothing a client could have seen: the client's headers are
    only sent with the first byte of the body."""
    started = False
    while True:
        try:
            for chunk in chunks:
                started = True
                yield chunk
            return
        except BROKEN_CONNECTION as exc:
            if started or not gen.start_over(exc):
                raise
            assert gen.answer is not None
            chunks = stream_chunks(gen.answer, watch)


def _plain(method: str, path: str, raw_body: bytes | None, content_type: str | None, services: Services,
           watch: ClientWatch) -> Response:
    """Routes that use no slot (models, embeddings): relayed directly."""
    resp = services.main.upstream.open(method, path, raw_body, watch, content_type=content_type)

    def body() -> Iterator[bytes]:
        try:
            with client_leaving():  # nothing to release but the connection, closed below
                yield from stream_chunks(resp, watch)
        except ApiError:
            pass  # llama-server stopped working on it: logged by upstream.StallWatch
        except BROKEN_CONNECTION as exc:
            log.warning("upstream connection broke while relaying %s: %s", path, exc)
        finally:
            resp.close()

    return Response(body(), status=resp.status, headers=relay_headers(resp))
