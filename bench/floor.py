"""`python -m bench.floor`: the least a Python relay under the proxy's own server can add.

A reference point for the overhead benchmark, not a product: a bare WSGI app (no Flask, no
admission gate, no metrics, no request log, no disconnect watch) that relays the request body
to llama-server on a kept-alive `http.client` connection per thread and returns the answer,
served by gunicorn with exactly the settings `python -m proxy` uses (one process, gthread,
same keep-alive). Measured in the same interleaved run, the latency it adds over direct
llama-server is what the server model costs by itself on that machine; the proxy's added
latency minus this is what llamabridge's own work costs.

Environment: LLAMA_URL (llama-server) and FLOOR_PORT (0 picks a free port; the address is in
gunicorn's "Listening at" line).
"""

from __future__ import annotations

import http.client
import os
import threading
from typing import Callable, Iterable
from urllib.parse import urlparse

from proxy.__main__ import SERVER_OPTIONS
from proxy.config import Settings
from proxy.serving import serve

_UPSTREAM = urlparse(os.environ.get("LLAMA_URL", "http://127.0.0.1:8080"))
_local = threading.local()


def _connection() -> http.client.HTTPConnection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = http.client.HTTPConnection(_UPSTREAM.hostname or "127.0.0.1", _UPSTREAM.port)
    return conn


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    conn = _connection()
    try:
        conn.request("POST", environ["PATH_INFO"], body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
    except (OSError, http.client.HTTPException):
        conn.close()  # llama-server closed the kept-alive connection: reconnect on the next request
        start_response("502 Bad Gateway", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    start_response(f"{answer.status} {answer.reason}", [("Content-Type", answer.getheader("Content-Type", "application/json")),
                                                         ("Content-Length", str(len(data)))])
    return [data]


def main() -> None:
    # The same gunicorn settings as `python -m proxy` with its default thread count.
    serve(lambda: app, bind=f"127.0.0.1:{os.environ.get('FLOOR_PORT', '0')}", threads=Settings.threads,
          loglevel="info", accesslog=None, proc_name="llamabridge-floor", **SERVER_OPTIONS)


if __name__ == "__main__":
    main()
