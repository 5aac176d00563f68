"""The collector's HTTP side: Prometheus `/metrics` and the JSON API the dashboard reads.

The scrape and retention jobs run in an APScheduler background scheduler inside the same
single process (see __main__.py), next to this app.
"""

from __future__ import annotations

import time

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import api
from .config import CollectorSettings
from .exporter import StoreCollector
from .job import ScrapeJob
from .store import Store


def create_app(settings: CollectorSettings, start_jobs: bool = True) -> Flask:
    app = Flask("llamabridge-collector")
    store = Store(settings.db_path)
    job = ScrapeJob(store, settings.llama_url, settings.interval)
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, job))
    if start_jobs:
        scheduler = BackgroundScheduler(daemon=True)
        # max_instances=1 and coalesce: a slow scrape is never run twice at once or caught up in a burst.
        scheduler.add_job(job.run, "interval", seconds=settings.interval, next_run_time=_now(), max_instances=1, coalesce=True,
                          id="scrape")
        scheduler.add_job(lambda: store.compact(time.time()), "interval", hours=1, next_run_time=_now(), id="retention")
        scheduler.start()
        app.extensions["scheduler"] = scheduler
    app.extensions["store"] = store
    app.extensions["job"] = job

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "upstream_up": job.up})

    app.register_blueprint(api.blueprint(store, lambda: {"up": job.up, "collector": True}))

    return app


def _now():  # APScheduler: run the first time right away
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


