"""The busiest routes' fast path (proxy/fastpath.py) against the Flask app it stands in front of.

In-process, on the WSGI app `create_app` returns, pointed at a llama-server address where nothing
listens: every request that reaches llama-server fails the same way (llama-server unreachable),
so what the fast path answers can be compared byte for byte with what the Flask route answers for
the same request. Real generations through the fast path, against the real llama-server, are
what the rest of the suite runs (test_proxy_llama, test_traffic, test_claude_code, ...).
"""

from __future__ import annotations

import io
import json

import pytest
from prometheus_client import CollectorRegistry
from werkzeug.datastructures import Headers
from werkzeug.test import EnvironBuilder

from proxy.app import create_app
from proxy.config import Settings
from tests.support.processes import free_port

LIMIT = 4096


@pytest.fixture()
def app():
    settings = Settings(llama_url=f"http://127.0.0.1:{free_port()}", db_path="", connect_timeout=2, upstream_slots=1, max_request_bytes=LIMIT)
    return create_app(settings, CollectorRegistry())


def run(wsgi, environ: dict) -> tuple[str, dict[str, str], bytes]:
    started: list = []
    body = b"".join(wsgi(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
    status, headers = started[0]
    return status, {k.lower(): v for k, v in headers}, body


def environ(method: str = "POST", path: str = "/v1/chat/completions", data: bytes | None = None, **headers: str) -> dict:
    content_type = "application/json" if method == "POST" else None  # the edge in front refuses any other body
    return EnvironBuilder(method=method, path=path, data=data, headers=Headers(headers), content_type=content_type).get_environ()


def fast_path(app):
    """The fast path, behind the edge checks (llamabridge/edge.py) that are the app's outermost layer."""
    return app.wsgi_app.app


class Recorder:
    """Stands in for the Flask app behind the fast path: notes what it is handed, then serves it."""

    def __init__(self, flask):
        self.flask, self.bodies = flask, []

    def __call__(self, env, start_response):
        self.bodies.append(env["wsgi.input"].read())
        env["wsgi.input"] = io.BytesIO(self.bodies[-1])
        return self.flask(env, start_response)


COMPLETION = json.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
MESSAGE = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"User-Agent": "claude-cli/2.1.328 (external, cli)", "X-Claude-Code-Session-Id": "s-1"}


@pytest.mark.parametrize("path, data, status, says", [
    ("/v1/chat/completions", COMPLETION, "503", "llama-server is unreachable"),
    ("/v1/completions", COMPLETION, "503", "llama-server is unreachable"),
    ("/v1/responses", json.dumps({"model": "m", "input": "hi"}).encode(), "503", "llama-server is unreachable"),
    ("/completion", json.dumps({"prompt": "hi", "n_predict": 1}).encode(), "503", "llama-server is unreachable"),
    ("/infill", json.dumps({"input_prefix": "a", "input_suffix": "b"}).encode(), "503", "llama-server is unreachable"),
    ("/v1/messages", MESSAGE, "529", "llama-server is unreachable"),
    ("/v1/messages", json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": []}).encode(), "400", "at least one message"),
])
def test_an_ordinary_request_skips_flask_and_is_answered_exactly_as_flask_would(app, path, data, status, says):
    fast = fast_path(app)
    flask = fast.flask
    recorder = fast.flask = Recorder(flask)
    answer = run(fast, environ(path=path, data=data, **HEADERS))
    assert recorder.bodies == []  # served without the Flask app
    assert answer == run(flask, environ(path=path, data=data, **HEADERS))
    got, headers, body = answer
    assert got.startswith(status + " ") and headers["content-type"] == "application/json"
    assert says in json.dumps(json.loads(body)["error"])
    if status != "400":
        assert headers["retry-after"] == "5"
    # The call was finished and recorded once by the error handler, each way in, with its class
    # and its agent.
    registry = app.extensions["llamabridge.services"].metrics.registry
    recorded = [s for metric in registry.collect() if metric.name == "llamabridge_proxy_requests" for s in metric.samples
                if s.name.endswith("_total")]
    assert [(s.labels["client"], s.labels["route"], s.value) for s in recorded] == [("claude-cli", path, 2)]
    assert recorded[0].labels["class"] != "-" or status == "400"


@pytest.mark.parametrize("request_env, status, says", [
    (environ(data=b""), "400", "request body is empty"),
    (environ(data=b"{oops"), "400", "not valid JSON"),
    (environ(data=b"[1, 2]"), "400", "must be a JSON object"),
    (environ(data='{"prompt": "caf\xe9"}'.encode("latin-1")), "400", "not valid UTF-8"),
    (environ(data=b"[" * 100_000 + b"]" * 100_000), "413", "MAX_REQUEST_BYTES"),
    (environ(data=b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}"), "400", "nested too deeply"),
    (environ(method="GET"), "405", "not allowed"),
    (environ(path="/v1/chat/completions/", data=COMPLETION), "404", "no route"),
    (environ(path="/v1/messages", data=b"[]"), "400", "expected a JSON object"),
    (environ(path="/v1/messages/count_tokens", data=b'{"model": "m", "messages": []}'), "400", "at least one message"),
])
def test_anything_else_goes_to_flask_with_its_body_intact(app, request_env, status, says):
    recorder = fast_path(app).flask = Recorder(fast_path(app).flask)
    sent = request_env["wsgi.input"].getvalue()
    got, headers, body = run(app.wsgi_app, request_env)
    # Whole for Flask: read by the fast path and put back, or (past the limit) not read at all.
    assert recorder.bodies == [sent]
    assert got.startswith(status + " ") and headers["content-type"] == "application/json"
    assert says in json.loads(body)["error"]["message"]


def test_a_body_without_a_length_goes_to_flask(app):
    """Chunked uploads (no Content-Length) are Flask's: it reads them to the end, within the limit."""
    recorder = fast_path(app).flask = Recorder(fast_path(app).flask)
    env = environ(data=COMPLETION)
    del env["CONTENT_LENGTH"]
    env["HTTP_TRANSFER_ENCODING"] = "chunked"
    env["wsgi.input_terminated"] = True  # as gunicorn says of a chunked body
    status, _, body = run(app.wsgi_app, env)
    assert recorder.bodies == [COMPLETION]
    assert status.startswith("503 ") and "llama-server is unreachable" in json.loads(body)["error"]["message"]
