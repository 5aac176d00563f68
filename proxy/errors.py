"""Every error the proxy sends is built here: one envelope per API, one status-to-type map.

Contract (the same one clients rely on): clients read `body["error"]["message"]`; it is always
a string and never empty, and `body["error"]["type"]` is always one of the API's documented types.
Anthropic routes get `{"type": "error", "error": {"type", "message"}}`; OpenAI routes get
`{"error": {"message", "type", "code"}}`. Inside an open Anthropic stream the same body goes out
as `event: error`; inside an open OpenAI stream, as a `data:` frame. A request gunicorn cannot
parse is answered before any route is known, with the fields both envelopes share
(`llamabridge.serving.protocol_body`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Response

ANTHROPIC = "anthropic"
OPENAI = "openai"

# Anthropic's documented error types by HTTP status. Claude Code retries 408/409/429/5xx/529
# with backoff (honouring retry-after) and shows the others to the user.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "unavailable_error",
    504: "server_error",
}


# OpenAI's error codes with the type its API sends beside them (a wrong key is an
# invalid_request_error there, not an authentication_error).
OPENAI_CODE_TYPES = {"invalid_api_key": "invalid_request_error", "rate_limit_exceeded": "rate_limit_error"}


class ApiError(Exception):
    """An error with the HTTP status a client should see. Raised anywhere; rendered by `render`."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None, error_type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message or "unknown error"
        self.retry_after = retry_after
        self.error_type = error_type
        self.code = code  # OpenAI's `error.code` where it names one ("invalid_api_key"); else the status


class Rejected(ApiError):
    """A request the proxy refuses by itself, before llama-server sees it (a body that is not
    JSON, a prompt that cannot fit): counted as `handled="rejected"`, not as llama-server's."""


def anthropic_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type or ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def openai_body(status: int, message: str, error_type: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type or OPENAI_TYPES.get(status, "server_error"), "code": code or status}}


def render(flavor: str, err: ApiError) -> Response:
    """The HTTP response for `err`, in the envelope of the route's API.

    Anthropic clients are told "overloaded" with 529 (what Claude Code treats as retryable
    capacity trouble); OpenAI clients have no 529, so they get 503.
    """
    status = err.status
    if flavor == ANTHROPIC:
        body = anthropic_body(status, err.message, err.error_type if err.error_type in ANTHROPIC_TYPES.values() else None)
    else:
        if status == 529:
            status = 503
        body = openai_body(status, err.message, OPENAI_CODE_TYPES.get(err.code or ""), err.code)
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def sse_error(err: ApiError) -> dict[str, Any]:
    """The data of an Anthropic `event: error`, for failures after a stream has started."""
    return anthropic_body(err.status, err.message)


def openai_stream_error(err: ApiError) -> dict[str, Any]:
    """The data of the `data:` frame that ends an OpenAI stream on a failure after it has
    started: what llama-server itself sends then (`{"error": {...}}`, and no `[DONE]`), and what
    the OpenAI SDKs raise as an APIError. The status is the one `render` gives (529 is 503)."""
    status = 503 if err.status == 529 else err.status
    return openai_body(status, err.message, OPENAI_CODE_TYPES.get(err.code or ""), err.code)


_CTX_NUMBERS = re.compile(r"\((\d+) tokens\).*?\((\d+) tokens\)")

# llama-server files some bad requests as its own failure. Its request parsers mostly reject
# bad input with std::invalid_argument, which it answers with 400, but these are thrown as
# std::runtime_error (or re-thrown so: common/chat.cpp wraps the message and tool checks) and
# answered with 500 "server_error" (tools/server/server-common.cpp, build b11434). Clients retry
# a 500 (the OpenAI SDKs twice, with backoff) and report an internal error; these are the
# request's fault, or something this server cannot do (an image for a model without a
# projector): 400, which clients show and do not retry.
_MISFILED_INPUT_ERRORS = (
    "Failed to parse messages: ",
    "Failed to parse tools: ",
    "image input is not supported",
    "audio input is not supported",
    "video input is not supported",
    "Multimodal data provided, but model does not support multimodal requests",
    "Invalid base64 value",
    "Failed to load image or audio file",
    '"prompt" is required',
    "Only no echo is supported",
    "Unsupported param: ",
    "tools param requires --jinja flag",
    "tool_choice param requires --jinja flag",
    "Cannot use both json_schema and grammar",
)


def from_upstream(status: int, raw: bytes | str) -> ApiError:
    """Turn an error response from llama-server into the error a client should see.

    - `exceed_context_size_error` (prompt longer than the slot's context) becomes a 400 whose
      message Claude Code recognises and shows as "Prompt is too long".
    - 503 "Loading model" and other unavailability become 529/503 "overloaded": retry later.
    - A 500 that llama-server sends for a bad request (see _MISFILED_INPUT_ERRORS) is a 400.
    - Other 4xx keep their status and llama-server's message; 5xx become 502 (the upstream failed,
      not the proxy).
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    err: dict[str, Any] = {}
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            inner = parsed.get("error")
            err = inner if isinstance(inner, dict) else parsed
    except ValueError:
        pass
    message = str(err.get("message") or text.strip() or f"upstream returned HTTP {status}")[:2000]
    kind = err.get("type")
    if kind == "exceed_context_size_error":
        n_prompt, n_ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
        if not (isinstance(n_prompt, int) and isinstance(n_ctx, int)):
            found = _CTX_NUMBERS.search(message)
            n_prompt, n_ctx = (int(found.group(1)), int(found.group(2))) if found else ("?", "?")
        return ApiError(400, f"prompt is too long: {n_prompt} tokens > {n_ctx} maximum")
    if status == 503 or kind == "unavailable_error":
        return ApiError(529, f"llama-server is not ready: {message}", retry_after=5)
    if status == 500 and message.startswith(_MISFILED_INPUT_ERRORS):
        return ApiError(400, f"llama-server: {message}")
    if status in (400, 401, 403, 404, 413, 429):
        return ApiError(status, f"llama-server: {message}")
    return ApiError(502, f"llama-server failed (HTTP {status}): {message}")


UPSTREAM_DOWN = "llama-server is unreachable at {url}: {reason}"
