"""Read llama-server: `/metrics` (parsed with prometheus-client's parser), `/slots`, `/props`,
and turn two readings of its counters into what was served in between.

llama-server's counters restart at 0 with the process. A counter lower than last time means a
restart, but a restarted server can climb past the old value between two scrapes, so the
`Process-Start-Time-Unix` header of `/metrics` (a clock reading taken when the process started;
a new value means a new process) is checked too. After a restart the whole new value is what
was served since; what the old process served after our last scrape is lost to polling.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "llamacpp:"
# The counters kept as lifetime totals (llama-server names without the prefix).
COUNTERS = ("prompt_tokens_total", "prompt_tokens_cached_total", "prompt_seconds_total", "tokens_predicted_total",
            "tokens_predicted_seconds_total", "n_decode_total")
# Not llama-server's *_tokens_seconds and n_busy_slots_per_decode gauges: each read of /metrics
# restarts their window, so with Prometheus reading too they hold whatever the other reader left.
# Speeds come from the counters (tokens over seconds) instead.
GAUGES = ("requests_processing", "requests_deferred")


@dataclass
class Reading:
    counters: dict[str, float]
    gauges: dict[str, float]
    process_start: str | None
    slots: list[dict[str, Any]] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)


class ScrapeError(Exception):
    """llama-server could not be read (down, loading, refusing our key, or answering garbage).

    `kind` names the cause for /metrics and the dashboard: "unreachable", "unauthorized",
    "http_error" or "not_metrics"."""

    def __init__(self, message: str, kind: str = "http_error"):
        super().__init__(message)
        self.kind = kind


def identity(props: dict[str, Any]) -> str | None:
    """Which server this is, as far as a restart does not change it: the model file and the
    build (from `/props`). None when `/props` was not read."""
    model = props.get("model_path") or props.get("model_alias")
    if not model:
        return None
    return json.dumps({"model": str(model), "build": str(props.get("build_info") or "")}, sort_keys=True)


def describe(ident: str) -> str:
    """An identity as one short phrase for events and logs."""
    try:
        parts = json.loads(ident)
        return f"{os.path.basename(parts['model'])} ({parts['build'] or 'unknown build'})"
    except (ValueError, KeyError, TypeError):
        return ident


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """(counters, gauges) from a `/metrics` text, keyed without the `llamacpp:` prefix."""
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ScrapeError(f"/metrics is not Prometheus text: {exc}", "not_metrics") from None
    for family in families:
        for sample in family.samples:
            if not sample.name.startswith(PREFIX):
                continue
            name = sample.name[len(PREFIX):]
            # prometheus-client names a counter family without "_total" and its sample with it.
            if name in COUNTERS:
                counters[name] = float(sample.value)
            elif name in GAUGES:
                gauges[name] = float(sample.value)
    if not counters:
        raise ScrapeError("/metrics has none of llama-server's counters (is it started with --metrics?)", "not_metrics")
    return counters, gauges


def deltas(last: dict[str, float], current: dict[str, float], restarted: bool) -> dict[str, float]:
    """What each counter advanced by since `last`.

    A counter with no previous value only sets the baseline (0); one that went backwards, or any
    counter when the process restarted, counts its whole new value; a counter missing from
    `current` is left alone (no delta, and its baseline is kept by the caller).
    """
    out: dict[str, float] = {}
    for name, value in current.items():
        previous = last.get(name)
        if previous is None:
            out[name] = 0.0
        elif restarted or value < previous:
            out[name] = value
        else:
            out[name] = value - previous
    return out


def restart_reason(last: dict[str, float], current: dict[str, float], last_start: str | None, start: str | None) -> str | None:
    """Why these two readings come from different llama-server processes, or None if they do not."""
    if not any(name in current for name in last):
        return None  # no baseline yet
    if last_start and start and start != last_start:
        return "new process start time"
    if any(current[name] < value for name, value in last.items() if name in current):
        return "counters went backwards"
    return None


def read(base_url: str, session: requests.Session, timeout: float = 5.0) -> Reading:
    """One reading of llama-server. Raises ScrapeError."""
    try:
        resp = session.get(f"{base_url}/metrics", timeout=timeout)
    except requests.RequestException as exc:
        raise ScrapeError(f"llama-server unreachable at {base_url}: {type(exc).__name__}", "unreachable") from None
    if resp.status_code in (401, 403):
        sent = "Authorization" in session.headers
        raise ScrapeError(f"llama-server refused /metrics (HTTP {resp.status_code}): "
                          + ("LLAMA_API_KEY is not the key it was started with (--api-key)" if sent else
                             "it needs an API key; set LLAMA_API_KEY to the key it was started with (--api-key)"),
                          "unauthorized")
    if resp.status_code == 501:
        raise ScrapeError("llama-server has /metrics turned off: start it with --metrics", "not_metrics")
    if resp.status_code != 200:
        raise ScrapeError(f"llama-server /metrics answered HTTP {resp.status_code}: {resp.text[:200]}")
    counters, gauges = parse_metrics(resp.text)
    reading = Reading(counters, gauges, resp.headers.get("Process-Start-Time-Unix"))
    for path, attr in (("/slots", "slots"), ("/props", "props")):
        try:
            extra = session.get(f"{base_url}{path}", timeout=timeout)
            if extra.status_code == 200:
                setattr(reading, attr, extra.json())
        except (requests.RequestException, ValueError):
            pass  # optional: /slots can be disabled; the counters are what matter
    return reading
