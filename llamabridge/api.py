"""The JSON API the dashboard reads, as a Flask blueprint: the collector serves it, and the
proxy serves it next to /dashboard, both reading the same SQLite store. Read-only."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, jsonify, request

from .store import Store

# Range -> (seconds, bucket): every scrape for an hour, a point a minute for a day, an hour for 30 days
# (360, 1440 and 720 points at 10 s scrapes), so each chart costs the same whatever its span.
RANGES = {"1h": (3600, 0), "24h": (86400, 60), "30d": (30 * 86400, 3600)}
# A store whose last scrape is older than this has no collector feeding it: upstream unknown.
STALE_SECONDS = 60


def stored_status(store: Store) -> dict[str, Any]:
    """Upstream state as the collector last recorded it (for a process that does not scrape)."""
    latest = store.latest_sample()
    last = store.meta("last_scrape")
    fresh = last is not None and time.time() - float(last) < STALE_SECONDS
    error = store.meta("upstream_error") if fresh else None
    return {"up": bool(fresh and latest and latest.get("up")), "collector": fresh, "error": error,
            "error_kind": store.meta("upstream_error_kind") if error else None}


def upstreams(store: Store) -> list[dict[str, Any]]:
    """Every llama-server the store has counted, with its lifetime totals (they add up to the
    store's) and its state as the collector last recorded it. One no longer scraped (taken out
    of LLAMA_URL, or with no collector running) is not `current`."""
    totals = store.upstream_totals()
    meta = store.upstream_meta()
    now = time.time()
    out = []
    for url in sorted(set(totals) | set(meta)):
        info, lifetime = meta.get(url, {}), totals.get(url, {})
        last = float(info["last_scrape"]) if info.get("last_scrape") else None
        current = last is not None and now - last < STALE_SECONDS
        out.append({
            "url": url or None,  # None: counted before the store kept totals per llama-server
            "current": current,
            "up": current and not info.get("upstream_error"),
            "error": info.get("upstream_error") if current else None,
            "last_scrape": last,
            "model": info.get("model") or None,
            "n_ctx": _int(info.get("n_ctx")),
            "slots": _int(info.get("total_slots")),
            "lifetime": _lifetime(lifetime, int(lifetime.get("upstream_restarts", 0))),
        })
    return out


def blueprint(store: Store, status: Callable[[], dict[str, Any]]) -> Blueprint:
    api = Blueprint("llamabridge_api", __name__)

    @api.get("/api/totals")
    def totals():
        lifetime = store.totals()
        since, last = store.meta("tracking_since"), store.meta("last_scrape")
        return jsonify({
            "since": float(since) if since else None,
            "last_scrape": float(last) if last else None,
            "upstream": {**status(), "model": store.meta("model"), "n_ctx": _int(store.meta("n_ctx")),
                         "slots": _int(store.meta("total_slots"))},
            "lifetime": _lifetime(lifetime, store.count_events("restart")),
            "upstreams": upstreams(store),
            "proxy": store.request_totals(),
            "now": store.latest_sample(),
        })

    @api.get("/api/samples")
    def samples():
        name = request.args.get("range", "1h")
        if name not in RANGES:
            name = "1h"
        span, bucket = RANGES[name]
        since = time.time() - span
        # One llama-server's own series, when LLAMA_URL lists several (otherwise all of them together).
        upstream = request.args.get("upstream") or None
        return jsonify({"range": name, "bucket": bucket, "upstream": upstream, "upstreams": store.sampled_upstreams(since),
                        "samples": store.samples(since, bucket, upstream=upstream)})

    @api.get("/api/events")
    def events():
        return jsonify({"events": store.events(time.time() - 30 * 86400)})

    @api.get("/api/requests")
    def requests_():
        try:
            limit = min(max(int(request.args.get("limit", 200)), 1), 2000)
        except ValueError:
            limit = 200
        rows = store.requests(limit, client=request.args.get("client"), klass=request.args.get("class"),
                              session=request.args.get("session"), user=request.args.get("user"))
        return jsonify({"requests": rows})

    @api.get("/api/users")
    def users():
        """Requests and tokens per API key name, for as long as the store has counted them."""
        return jsonify({"users": store.user_totals()})

    @api.get("/api/sessions")
    def sessions():
        """Recent Claude Code sessions with their conversation turns (main and subagent)."""
        rows = [r for r in store.requests(2000) if r["session"] and r["class"] in ("main", "subagent")]
        grouped: dict[str, list[dict]] = {}
        for row in reversed(rows):  # oldest first within a session
            grouped.setdefault(row["session"], []).append(row)
        ordered = sorted(grouped.items(), key=lambda kv: kv[1][-1]["ts"], reverse=True)[:20]
        return jsonify({"sessions": [{"session": s, "client": turns[-1]["client"], "turns": turns} for s, turns in ordered]})

    return api


def _lifetime(totals: dict[str, float], restarts: int) -> dict[str, Any]:
    """llama-server's lifetime totals (all of them, or one upstream's) as the dashboard reads them."""
    return {
        "prompt_tokens": totals.get("prompt_tokens_total", 0),
        "cached_prompt_tokens": totals.get("prompt_tokens_cached_total", 0),
        "generated_tokens": totals.get("tokens_predicted_total", 0),
        "prompt_seconds": totals.get("prompt_seconds_total", 0),
        "generation_seconds": totals.get("tokens_predicted_seconds_total", 0),
        "upstream_restarts": restarts,
    }


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
