"""The Flask application: routes, body parsing, and the error handlers.

Every response that is not a success goes through `errors.render`, in the envelope of the
route's API (Anthropic on `/v1/messages*`, OpenAI elsewhere), so no client ever sees an HTML
error page or a bare 500.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, g, jsonify, redirect, request
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException

from dashboard import page_and_policy
from llamabridge import api
from llamabridge.edge import Edge, required
from llamabridge.keys import KeyFile

from . import errors, messages, models, relay, translate
from .config import Settings
from .disconnect import ClientDisconnected, ClientWatch
from .errors import ApiError, Rejected
from .fastpath import BareResponse, FastPath, Handler, json_body
from .metrics import Call
from .services import Services
from .upstream import Upstream

log = logging.getLogger("llamabridge.proxy")

OPENAI_ROUTES = {
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/responses": ("POST",),
    "/completion": ("POST",),
    "/infill": ("POST",),
    "/v1/embeddings": ("POST",),
    "/v1/models": ("GET",),
}


def flavor_of(path: str, headers: Any) -> str:
    """Anthropic's envelope on `/v1/messages*`, and on `/v1/models*` for Anthropic's clients
    (the path both APIs share; see models.py); OpenAI's elsewhere."""
    if path.startswith("/v1/messages"):
        return errors.ANTHROPIC
    if path.startswith("/v1/models") and models.wants_anthropic(headers):
        return errors.ANTHROPIC
    return errors.OPENAI


def parse_json_body() -> Any:
    """The request body as JSON, or an ApiError(400) that says exactly what is wrong with it."""
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw:
        raise Rejected(400, "request body is empty; expected a JSON object")
    return json_body(raw)


class ApiMode:
    """Which way `/v1/messages` reaches llama-server; `auto` is settled by the first conclusive
    answer to `GET /props`.

    200 is llama-server: translate, which covers its native endpoint's gaps. 404 or 405 is a
    server without `/props`, so not llama-server: its Anthropic API gets requests passed
    through. Anything else settles nothing: a llama-server still loading its model answers 503,
    and settling then would pass every request of the process's life through to the native
    endpoint. That request gets a retryable error, and the next one asks again.
    """

    def __init__(self, settings: Settings, upstream: Upstream):
        self._configured = settings.upstream_api
        self._upstream = upstream
        self._resolved: str | None = None if settings.upstream_api == "auto" else settings.upstream_api
        self._lock = threading.Lock()

    def get(self) -> str:
        if self._resolved is not None:
            return self._resolved
        with self._lock:
            if self._resolved is None:
                # Unreachable: ApiError(529) from request(), and nothing settled.
                resp = self._upstream.request("GET", "/props", timeout=10)
                if resp.status_code == 200:
                    self._resolved = "openai"
                elif resp.status_code in (404, 405):
                    self._resolved = "anthropic"
                elif resp.status_code >= 500:
                    raise ApiError(529, f"UPSTREAM_API=auto: {self._upstream.base} is not ready (GET /props answered HTTP "
                                        f"{resp.status_code}: {resp.text[:200]}); retry", retry_after=5)
                else:
                    raise ApiError(502, f"UPSTREAM_API=auto: cannot tell what {self._upstream.base} is: GET /props answered "
                                        f"HTTP {resp.status_code}: {resp.text[:200]} (is LLAMA_API_KEY right?)")
                log.info("UPSTREAM_API=auto: using %s for /v1/messages", self._resolved)
            return self._resolved


# Liveness answers anyone: Docker's health check and Claude Code's start-up check carry no key.
OPEN_ROUTES = frozenset({("HEAD", "/"), ("HEAD", "/api/hello"), ("GET", "/healthz"), ("HEAD", "/healthz")})
# What a browser opens: a 401 there asks it for the key (as the password of HTTP Basic).
LOGIN_PREFIXES = ("/dashboard", "/api/", "/metrics")


def refusal(environ: dict, start_response: Callable, status: int, message: str, code: str | None,
            headers: list) -> Iterable[bytes]:
    """A request refused at the edge (llamabridge/edge.py), in its route's envelope."""
    response = errors.render(flavor_of(environ.get("PATH_INFO", ""), EnvironHeaders(environ)), ApiError(status, message, code=code))
    response.headers.extend(headers)
    return response(environ, start_response)


def new_call() -> Call:
    """The record of this request, kept on flask.g so the error handlers can finish it."""
    g.call = Call.of(request.path, request.environ)
    return g.call


def _finish_call(services: Services, status: int, message: str, rejected: bool = False) -> None:
    call = getattr(g, "call", None)
    if call is not None and not call.recorded:
        call.status, call.error = status, message
        if rejected:
            call.handled = "rejected"
        services.metrics.record(call)


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> Flask:
    app = Flask("llamabridge")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    services = Services(settings, registry)
    services.watch_health()
    upstream = services.main.upstream
    mode = ApiMode(settings, upstream)
    app.extensions["llamabridge.services"] = services

    @app.errorhandler(ApiError)
    def on_api_error(err: ApiError) -> Response:
        if err.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.path, err.status, err.message)
        _finish_call(services, err.status, err.message, rejected=isinstance(err, errors.Rejected))
        return errors.render(flavor_of(request.path, request.headers), err)

    @app.errorhandler(translate.InvalidRequest)
    def on_invalid(err: translate.InvalidRequest) -> Response:
        _finish_call(services, 400, str(err), rejected=True)
        return errors.render(flavor_of(request.path, request.headers), ApiError(400, str(err)))

    @app.errorhandler(HTTPException)
    def on_http_error(err: HTTPException) -> Response:
        status = err.code or 500
        if status == 413:
            message = f"request body is larger than the proxy's limit of {settings.max_request_bytes} bytes (MAX_REQUEST_BYTES)"
        elif status == 404:
            message = f"no route {request.method} {request.path} on llamabridge"
        elif status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = err.description or err.name
        return errors.render(flavor_of(request.path, request.headers), ApiError(status, message))

    @app.errorhandler(ClientDisconnected)
    def on_client_gone(err: ClientDisconnected) -> Response:
        # Nobody is listening; the upstream request is already closed. 499 is nginx's name for it.
        log.info("%s %s: client disconnected before llama-server answered", request.method, request.path)
        _finish_call(services, 499, "client disconnected")
        return Response(status=499)

    @app.errorhandler(Exception)
    def on_unexpected(err: Exception) -> Response:
        # A bug, not the client's fault: log the traceback, keep the worker, answer in envelope.
        log.exception("unhandled error on %s %s", request.method, request.path)
        _finish_call(services, 500, type(err).__name__)
        return errors.render(flavor_of(request.path, request.headers), ApiError(500, f"llamabridge internal error: {type(err).__name__}"))

    @app.after_request
    def prepare_connections(response: Response) -> Response:
        # Once the response has gone out (on close), not on the request's own path.
        response.call_on_close(services.prepare_connections)
        return response

    @app.route("/", methods=["GET", "HEAD"])
    def root() -> Response:
        return jsonify({"name": "llamabridge", "status": "ok", "upstream": settings.upstream_base})

    @app.route("/api/hello", methods=["GET", "HEAD"])
    def hello() -> Response:
        # Claude Code's start-up connectivity check: answer at once, without touching upstream.
        return jsonify({"status": "ok"})

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> Response:
        each = [(u.base, *u.health()) for u in services.main.upstreams]
        ok = any(ready for _, ready, _ in each)
        ready_one = next(((base, reason) for base, ready, reason in each if ready), each[0][::2])
        body: dict = {"status": "ok" if ok else "unavailable", "upstream": ready_one[0], "detail": ready_one[1],
                      "kv_cache": services.kv.status()}
        if len(each) > 1:
            body["upstreams"] = [{"url": base, "ready": ready, "detail": reason, "in_rotation": services.main.gate.is_up(i)}
                                 for i, (base, ready, reason) in enumerate(each)]
        return Response(json.dumps(body), status=200 if ok else 503, mimetype="application/json")

    if services.request_log is not None:
        # The dashboard and the JSON it reads, from the store the collector fills.
        store = services.request_log.store
        app.register_blueprint(api.blueprint(store, lambda: {**api.stored_status(store), "queued": services.main.gate.depth()}))

    page, policy = page_and_policy()

    @app.route("/dashboard", methods=["GET"])
    def dashboard() -> Response:
        return Response(page, mimetype="text/html", headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})

    @app.route("/dashboard/", methods=["GET"])
    def dashboard_slash() -> ResponseReturnValue:
        # The page reads its JSON by relative URL (so that it works behind a path prefix), which
        # under /dashboard/ would point into /dashboard/api/...: send the browser to the one URL.
        # Relative, so the redirect keeps any prefix in front of the proxy too.
        return redirect("../dashboard", 308)

    @app.route("/metrics", methods=["GET"])
    def metrics() -> Response:
        return Response(generate_latest(services.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    def message(body: Any, raw: bytes, environ: dict, call: Call) -> Response:
        """POST /v1/messages once its body is JSON (here, or straight from the fast path)."""
        body = translate.validate_common(body, need_max_tokens=True)
        call.model = body["model"]
        native = mode.get() == "anthropic"
        return messages.create_message(body, hashlib.sha256(raw).hexdigest(), services, ClientWatch(environ), call, native)

    @app.route("/v1/messages", methods=["POST"])
    def create_message() -> Response:
        call = new_call()
        return message(parse_json_body(), request.get_data(cache=True), request.environ, call)

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    def count_tokens() -> Response:
        call = new_call()
        body = translate.validate_common(parse_json_body(), need_max_tokens=False)
        return messages.count_tokens(body, services, native=mode.get() == "anthropic", call=call)

    def model_entries() -> tuple[Any, list[dict]]:
        """llama-server's model list, each with the context window a request really gets (per slot)."""
        listing = upstream.json("GET", "/v1/models", timeout=10)
        info = services.main.info(settings.upstream_slots)
        return listing, models.openai_entries(listing, info.n_ctx, info.total_slots)

    @app.route("/v1/models", methods=["GET"])
    def list_models() -> Response:
        listing, entries = model_entries()
        if models.wants_anthropic(request.headers):
            return jsonify(models.anthropic_page(entries, request.args))
        return jsonify(listing)

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def get_model(model_id: str) -> Response:
        model = models.find(model_entries()[1], model_id)
        return jsonify(models.anthropic_entry(model) if models.wants_anthropic(request.headers) else model)

    def openai_relay() -> Response:
        call = new_call()
        raw, parsed = None, None
        if request.method == "POST":
            parsed = parse_json_body()  # refuse bad JSON here, in a clear OpenAI error
            if not isinstance(parsed, dict):
                raise Rejected(400, "request body must be a JSON object")
            raw = request.get_data(cache=True)
        return relay.relay(request.method, request.path, parsed, raw, request.content_type, services,
                           ClientWatch(request.environ), call)

    for path, methods in OPENAI_ROUTES.items():
        if path != "/v1/models":
            app.add_url_rule(path, endpoint=path, view_func=openai_relay, methods=list(methods))

    def completion(body: dict, raw: bytes, environ: dict, call: Call) -> BareResponse:
        return BareResponse(*relay.generation(call.route, body, raw, services, ClientWatch(environ), call))

    # The busiest routes' ordinary requests skip Flask's request handling (fastpath.py).
    fast_routes: dict[str, Handler] = {"/v1/messages": message, **{path: completion for path in relay.GENERATION_ROUTES}}
    fast = FastPath(app, fast_routes, settings.max_request_bytes, services.prepare_connections)
    # In front of everything, the fast path included: browser attacks refused, keys checked.
    # (Replacing `wsgi_app` is how Flask documents wrapping an app in middleware.)
    app.wsgi_app = Edge(fast, settings.edge, KeyFile(settings.edge.keys_file), refusal,  # type: ignore[method-assign]
                        required=required(settings.edge, settings.host), open_routes=OPEN_ROUTES,
                        login_prefixes=LOGIN_PREFIXES, refused=services.metrics.refused)
    return app
