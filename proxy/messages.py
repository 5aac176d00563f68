"""The Anthropic routes: `/v1/messages` and `/v1/messages/count_tokens`.

Two ways to reach llama-server, chosen by `UPSTREAM_API`:
- `openai` (default): llamabridge's own translation to `/v1/chat/completions` (translate.py),
  which covers what llama-server's native Anthropic endpoint gets wrong (adaptive thinking,
  images in tool results, tool results after user text, named tool_choice, pings in prefill).
- `anthropic`: llama-server's native `/v1/messages`, with the same request fixes applied
  (model name mapped, billing header removed) and errors put in Anthropic's envelope.
"""

from __future__ import annotations

import json
import logging
from typing import Iterator

from flask import Response
from urllib3.exceptions import HTTPError as Urllib3Error

from . import sse, translate
from .disconnect import ClientDisconnected, ClientWatch
from .errors import ApiError, from_upstream, sse_error
from .upstream import Answer, Upstream, read_all, relay_headers, stream_chunks, stream_lines

log = logging.getLogger("llamabridge.messages")

# Ask llama-server for an SSE comment every second while it has nothing else to send
# (prefill of a long prompt): each one gives us a chance to notice a vanished client.
UPSTREAM_PING_SECONDS = 1

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# What a broken upstream connection looks like while reading it.
BROKEN = (OSError, Urllib3Error, sse.StreamProtocolError)
BROKE_MESSAGE = "the connection to llama-server broke mid-response"


def _open(path: str, payload: dict, upstream: Upstream, watch: ClientWatch) -> Answer:
    """POST `payload`; an error status becomes the ApiError the client should see."""
    resp = upstream.open("POST", path, json.dumps(payload, ensure_ascii=False).encode(), watch)
    if resp.status >= 400:
        try:
            raw = read_all(resp, watch)
        finally:
            resp.close()
        raise from_upstream(resp.status, raw)
    return resp


def _anthropic_stream(events: Iterator[tuple[str, dict]], resp: Answer) -> Iterator[bytes]:
    """Encode events as SSE; a failure after the stream started becomes `event: error`."""
    try:
        for event, data in events:
            yield sse.encode(event, data)
    except ClientDisconnected:
        log.info("client disconnected; closed the upstream request")
    except translate.UpstreamStreamError as exc:
        status = exc.error.get("code") if isinstance(exc.error.get("code"), int) else 500
        yield sse.encode("error", sse_error(from_upstream(status, json.dumps({"error": exc.error}))))
    except BROKEN as exc:
        log.warning("upstream stream broke: %s", exc)
        yield sse.encode("error", sse_error(ApiError(502, f"{BROKE_MESSAGE}: {type(exc).__name__}")))
    finally:
        # Closing the upstream connection is what stops generation and frees llama-server's slot.
        resp.close()


def create_message(body: dict, upstream: Upstream, watch: ClientWatch) -> Response:
    info = upstream.info()
    request = translate.anthropic_to_openai(body, translate.Options(model=info.model, vision=info.vision))
    request["sse_ping_interval"] = UPSTREAM_PING_SECONDS
    resp = _open("/v1/chat/completions", request, upstream, watch)
    events = translate.stream_openai_to_anthropic(sse.decode_openai(stream_lines(resp, watch)), model=body["model"])
    if body.get("stream") is True:
        return Response(_anthropic_stream(events, resp), mimetype="text/event-stream", headers=SSE_HEADERS)
    try:
        message = translate.collect_message(events)
    except translate.UpstreamStreamError as exc:
        status = exc.error.get("code") if isinstance(exc.error.get("code"), int) else 500
        raise from_upstream(status, json.dumps({"error": exc.error})) from None
    except BROKEN as exc:
        raise ApiError(502, f"{BROKE_MESSAGE}: {type(exc).__name__}") from None
    finally:
        resp.close()
    return Response(json.dumps(message, ensure_ascii=False), mimetype="application/json")


def count_tokens(body: dict, upstream: Upstream) -> dict[str, int]:
    """The exact number of prompt tokens `create_message` would send for this request.

    Renders our translation with llama-server's own chat template (`/apply-template`) and
    tokenizer (`/tokenize`), with the special tokens a completion adds: no slot is used.
    """
    info = upstream.info()
    rendered = upstream.json("POST", "/apply-template", translate.count_tokens_request(body, translate.Options(vision=info.vision)))
    prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
    if not isinstance(prompt, str):
        raise ApiError(502, "llama-server's /apply-template did not return a prompt")
    tokens = upstream.json("POST", "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
    return {"input_tokens": len(tokens.get("tokens") or [])}


# --------------------------------------------------------------------------------------------
# Native passthrough (UPSTREAM_API=anthropic)


def _native_body(body: dict, upstream: Upstream) -> dict:
    out = dict(body)
    out["model"] = upstream.info().model
    if out.get("system") is not None:
        # Same cache fix as the translation: drop the per-session billing header block.
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


def passthrough(path: str, body: dict, upstream: Upstream, watch: ClientWatch) -> Response:
    resp = _open(path, _native_body(body, upstream), upstream, watch)
    if body.get("stream") is not True:
        try:
            raw = read_all(resp, watch)
        except BROKEN as exc:
            raise ApiError(502, f"{BROKE_MESSAGE}: {type(exc).__name__}") from None
        finally:
            resp.close()
        return Response(_with_model(raw, body["model"]), status=resp.status, mimetype="application/json")

    def relay() -> Iterator[bytes]:
        try:
            yield from _rename_first_event(stream_chunks(resp, watch), body["model"])
        except ClientDisconnected:
            log.info("client disconnected; closed the upstream request")
        except BROKEN as exc:
            log.warning("upstream stream broke: %s", exc)
            yield sse.encode("error", sse_error(ApiError(502, BROKE_MESSAGE)))
        finally:
            resp.close()

    return Response(relay(), status=resp.status, headers=relay_headers(resp))
