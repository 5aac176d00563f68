"""Native passthrough (`UPSTREAM_API=anthropic`): llama-server's own `/v1/messages`, with the
request fixes the translation makes too (model name mapped, billing header removed), the
client's model name put back in the answer, and errors in Anthropic's envelope.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Response

from . import sse, translate
from .disconnect import ClientWatch
from .errors import sse_error
from .generation import BROKEN, Generation
from .http1 import read_all, stream_chunks
from .metrics import Call
from .reply import error_for
from .services import Services, Target
from .upstream import relay_headers


def native_body(body: dict, model: str) -> dict:
    """The client's body as llama-server should get it."""
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


def run(body: dict, target: Target, services: Services, watch: ClientWatch, call: Call) -> Response:
    """llama-server's native /v1/messages, admitted through the same gate (waiting without pings)."""
    gen = Generation(services, target, call, watch, "/v1/messages", native_body(body, target.upstream.info().model))
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
        raise error_for(exc) from None
    if not stream:
        try:
            call.usage(json.loads(raw).get("usage"))
        except (ValueError, AttributeError):
            pass  # not a message: relayed as it is, without usage in the log
        gen.close()
        return Response(_with_model(raw, body["model"]), status=answer.status, mimetype="application/json")

    def broken(exc: BaseException) -> Iterator[bytes]:
        yield sse.encode("error", sse_error(error_for(exc)))

    chunks = _rename_first_event(stream_chunks(answer, watch), body["model"])
    return Response(gen.relay(chunks, broken), status=answer.status, headers=relay_headers(answer))
