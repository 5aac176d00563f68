"""The busiest routes' ordinary requests, served in front of Flask's request handling.

`POST /v1/messages` and the generation routes (`/v1/chat/completions`, `/v1/completions`,
`/v1/responses`, `/completion`, `/infill`) are what agents send on every turn. Flask's part of
such a request (request and response objects, URL matching, context push and pop,
after-request hooks) costs more than the relay's own work: the benchmark's reference rows
(`make bench`, bench/floor.py) measure it. So a POST to one of those routes with a body that is
a JSON object within the size limit goes from WSGI straight to the route's handler, the same
function its Flask view calls.

Everything else is Flask's, so its answers stay the only ones: other routes and methods, and a
missing, empty, oversized, chunked or malformed body (handed on unread, or re-readable). An
error raised by a handler is rendered by the Flask app's own error handlers, inside a request
context made for it, exactly as if the Flask view had raised it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, g
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import ClosingIterator

from .errors import ApiError, Rejected
from .metrics import Call

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
# A route's handler: (the body as a JSON object, its bytes, the WSGI environ, the request's
# record) to the response, as a WSGI app (a Flask Response, or a BareResponse).
Handler = Callable[[dict, bytes, dict, Call], WSGIApp]


class BareResponse:
    """A response that is only a status, headers and a body iterator (no Response object)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: Iterator[bytes]):
        self.status, self.headers, self.body = status, headers, body

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        start_response(f"{self.status} {HTTP_STATUS_CODES.get(self.status, 'UNKNOWN')}", self.headers)
        return self.body


class FastPath:
    """WSGI middleware: `app.wsgi_app = FastPath(app, {path: handler}, max_bytes, after)`.

    `after` runs once each fast response has gone out, as the Flask app's after-request hook
    does for its own."""

    def __init__(self, app: Flask, routes: dict[str, Handler], max_bytes: int, after: Callable[[], None]):
        self.app = app
        self.flask: WSGIApp = app.wsgi_app
        self.routes = routes
        self.max_bytes = max_bytes
        self.after = after

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        handler = self.routes.get(path)
        if handler is None or environ.get("REQUEST_METHOD") != "POST":
            return self.flask(environ, start_response)
        declared = environ.get("CONTENT_LENGTH") or ""
        length = int(declared) if declared.isdigit() else 0
        if not 0 < length <= self.max_bytes or "HTTP_TRANSFER_ENCODING" in environ:
            return self.flask(environ, start_response)
        raw = environ["wsgi.input"].read(length)
        try:
            body = json_body(raw) if len(raw) == length else None
        except ApiError:
            body = None
        if not isinstance(body, dict):
            environ["wsgi.input"] = io.BytesIO(raw)  # Flask reads it again and says what is wrong
            return self.flask(environ, start_response)
        call = Call.of(path, environ)
        try:
            response = handler(body, raw, environ, call)
        except Exception as err:  # noqa: BLE001 - rendered exactly as Flask renders it
            with self.app.request_context(environ):
                g.call = call
                return flask_error_response(self.app, err)(environ, start_response)
        return ClosingIterator(response(environ, start_response), self.after)


def flask_error_response(app: Flask, err: Exception) -> WSGIApp:
    """The response Flask's error handlers give `err` (they finish and record the call), inside
    the request context the caller pushed.

    The one reach into Flask's request handling: these two steps are what
    `Flask.full_dispatch_request` does with an exception from a view, so an error from a fast
    handler gets the very answer, hooks included, that its Flask view would. Pinned by
    tests/test_fastpath.py, which compares the two byte for byte.
    """
    return app.finalize_request(app.handle_user_exception(err))


def json_body(raw: bytes) -> Any:
    """A request body as JSON, or an ApiError(400) that says exactly what is wrong with it (the
    one parser of client bodies, for Flask's views and the fast path alike)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Rejected(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise Rejected(400, "request body is nested too deeply") from None
