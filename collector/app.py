"""The collector's HTTP side: Prometheus `/metrics` and the JSON API the dashboard reads.

The scrape and retention jobs run in an APScheduler background scheduler inside the same
single process (see __main__.py), next to this app.
"""

from __future__ import annotations

import atexit
import json
import time
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.http import HTTP_STATUS_CODES

from llamabridge import api
from llamabridge.edge import Edge, required
from llamabridge.keys import KeyFile
from llamabridge.store import Store

from .config import CollectorSettings
from .exporter import StoreCollector
from .job import ScrapeJob


def create_app(settings: CollectorSettings, start_jobs: bool = True) -> Flask:
    app = Flask("llamabridge-collector")
    store = Store(settings.db_path)
    job = ScrapeJob(store, settings.llama_urls, settings.interval, settings.llama_api_key)
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, job))
    if start_jobs:
        scheduler = BackgroundScheduler(daemon=True)
        # max_instances=1 and coalesce: a slow scrape is never run twice at once or caught up in a burst.
        scheduler.add_job(job.run, "interval", seconds=settings.interval, next_run_time=_now(), max_instances=1, coalesce=True,
                          id="scrape")
        scheduler.add_job(lambda: store.compact(time.time(), settings.retention), "interval", hours=1, next_run_time=_now(),
                          id="retention")
        scheduler.start()
        app.extensions["scheduler"] = scheduler
        # On a graceful stop (SIGTERM, Ctrl-C) the lease is given up, so a standby collector on
        # the same store takes over at its next scrape rather than after the lease runs out.
        atexit.register(job.stop)
    app.extensions["store"] = store
    app.extensions["job"] = job

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    def status() -> dict:
        if job.standby is not None:  # what the collector that writes the store last recorded
            return {**api.stored_status(store), "standby": True}
        return {"up": job.up, "collector": True, "standby": False, "error": str(job.error) if job.error else None,
                "error_kind": job.error.kind if job.error else None}

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "upstream_up": job.up, "standby": job.standby is not None,
                        "upstreams": [{"url": u.url, "up": u.up, "error": str(u.error) if u.error and not u.up else None}
                                      for u in job.upstreams]})

    app.register_blueprint(api.blueprint(store, status))

    # The same checks as the proxy's, with the same keys: the JSON API holds the request log.
    # (Replacing `wsgi_app` is how Flask documents wrapping an app in middleware.)
    app.wsgi_app = Edge(app.wsgi_app, settings.edge, KeyFile(settings.edge.keys_file), _refuse,  # type: ignore[method-assign]
                        required=required(settings.edge, settings.host),
                        open_routes=frozenset({("GET", "/healthz"), ("HEAD", "/healthz")}),
                        login_prefixes=("/api/", "/metrics"))
    return app


def _refuse(environ: dict, start_response, status: int, message: str, code: str | None, headers: list):
    """A refusal at the edge, in the OpenAI-style envelope the collector's readers (Prometheus,
    curl, a browser) see."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code or status}}).encode()
    start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'Error')}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]


def _now():  # APScheduler: run the first time right away
    from datetime import datetime

    return datetime.now(UTC)


