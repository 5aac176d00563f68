"""The collector's HTTP side: Prometheus `/metrics` and the JSON API the dashboard reads.

The scrape and retention jobs run in an APScheduler background scheduler inside the same
single process (see __main__.py), next to this app.
"""

from __future__ import annotations

import time

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import CollectorSettings
from .exporter import StoreCollector
from .job import ScrapeJob
from .store import Store

RANGES = {"1h": 3600, "24h": 86400, "30d": 30 * 86400}


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
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "upstream_up": job.down_since is None and job.last_success is not None})

    @app.get("/api/totals")
    def totals() -> Response:
        lifetime = store.totals()
        since = store.meta("tracking_since")
        last = store.meta("last_scrape")
        return jsonify({
            "since": float(since) if since else None,
            "last_scrape": float(last) if last else None,
            "upstream": {"up": job.down_since is None and job.last_success is not None, "url": settings.llama_url,
                         "model": store.meta("model"), "n_ctx": _int(store.meta("n_ctx")), "slots": _int(store.meta("total_slots"))},
            "lifetime": {
                "prompt_tokens": lifetime.get("prompt_tokens_total", 0),
                "cached_prompt_tokens": lifetime.get("prompt_tokens_cached_total", 0),
                "generated_tokens": lifetime.get("tokens_predicted_total", 0),
                "prompt_seconds": lifetime.get("prompt_seconds_total", 0),
                "generation_seconds": lifetime.get("tokens_predicted_seconds_total", 0),
                "upstream_restarts": store.count_events("restart"),
            },
            "proxy": store.request_totals(),
            "now": store.latest_sample(),
        })

    @app.get("/api/samples")
    def samples() -> Response:
        span = RANGES.get(request.args.get("range", "1h"), 3600)
        return jsonify({"range": request.args.get("range", "1h"), "samples": store.samples(time.time() - span)})

    @app.get("/api/events")
    def events() -> Response:
        return jsonify({"events": store.events(time.time() - 30 * 86400)})

    @app.get("/api/requests")
    def requests_() -> Response:
        limit = min(max(int(request.args.get("limit", 200) or 200), 1), 2000)
        rows = store.requests(limit, client=request.args.get("client"), klass=request.args.get("class"),
                              session=request.args.get("session"))
        return jsonify({"requests": rows})

    return app


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
