"""`python -m bench.floor`: the least a Python relay under the proxy's own server can add.

Reference points for the overhead benchmark, not a product. FLOOR_APP=wsgi (the default) is a
bare WSGI app (no Flask, no admission gate, no metrics, no request log, no disconnect watch)
that relays the request body to llama-server with the proxy's own upstream client (kept-alive
connections, httptools; `proxy/upstream.py` over `proxy/http1.py`) and returns the answer; FLOOR_APP=flask is the
same relay as a one-route Flask app.
Either is served by gunicorn with exactly the settings `python -m proxy` uses (one process,
the same threaded worker, same keep-alive). Measured in the same interleaved run, the latency the bare one adds
over direct llama-server is what the server model costs by itself on that machine, and the
proxy's excess over it is what llamabridge's own work costs (its completion and message routes
skip Flask's request handling: proxy/fastpath.py). The Flask one's excess over the bare one is
what Flask's request handling would add.

Environment: LLAMA_URL (llama-server), FLOOR_APP, and FLOOR_PORT (0 picks a free port; the
address is in gunicorn's "Listening at" line).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from http import HTTPStatus

from llamabridge.serving import serve
from proxy.__main__ import SERVER_OPTIONS
from proxy.config import Settings
from proxy.disconnect import ClientWatch
from proxy.errors import ApiError
from proxy.http1 import BROKEN_CONNECTION, read_all
from proxy.upstream import Upstream

_UPSTREAM = Upstream(Settings(llama_url=os.environ.get("LLAMA_URL", "http://127.0.0.1:8080")))
_NO_CLIENT = ClientWatch({})  # no disconnect watch: that is the proxy's own work


def _relay(path: str, body: bytes) -> tuple[int, str, bytes]:
    """llama-server's status line, content type and body for this request (502 if it broke)."""
    try:
        answer = _UPSTREAM.open("POST", path, body, _NO_CLIENT)
    except ApiError:
        return 502, "text/plain", b""
    try:
        return answer.status, answer.headers.get("Content-Type") or "application/json", read_all(answer, _NO_CLIENT)
    except BROKEN_CONNECTION:
        return 502, "text/plain", b""
    finally:
        answer.close()


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    status, content_type, data = _relay(environ["PATH_INFO"], environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
    start_response(f"{status} {HTTPStatus(status).phrase}", [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


def flask_app():
    """The same relay as one Flask route: what Flask's request handling adds on top."""
    from flask import Flask, Response, request

    flask = Flask("llamabridge-floor")

    @flask.route("/", methods=["GET"])
    def root() -> str:
        return "ok"

    @flask.route("/v1/chat/completions", methods=["POST"])
    def chat() -> Response:
        status, content_type, data = _relay(request.path, request.get_data())
        return Response(data, status=status, content_type=content_type)

    return flask


def main() -> None:
    load = flask_app if os.environ.get("FLOOR_APP", "wsgi") == "flask" else (lambda: app)
    # The same gunicorn settings as `python -m proxy` with its default thread count.
    serve(load, bind=f"127.0.0.1:{os.environ.get('FLOOR_PORT', '0')}", threads=Settings.threads,
          loglevel="info", accesslog=None, proc_name="llamabridge-floor", **SERVER_OPTIONS)


if __name__ == "__main__":
    main()
