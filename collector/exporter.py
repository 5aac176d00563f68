"""Prometheus metrics of the collector, built from the store at every scrape (a custom
collector: nothing is cached in the process, and an unreadable store yields nothing)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llamabridge.store import Store

from .job import ScrapeJob

log = logging.getLogger("llamabridge.exporter")

# Lifetime counter name (without _total) -> llama-server counter it totals.
LIFETIME = {
    "llamabridge_lifetime_prompt_tokens": ("prompt_tokens_total", "Prompt tokens llama-server evaluated (not from cache), since tracking began."),
    "llamabridge_lifetime_cached_prompt_tokens": ("prompt_tokens_cached_total", "Prompt tokens taken from llama-server's prompt cache."),
    "llamabridge_lifetime_generated_tokens": ("tokens_predicted_total", "Tokens llama-server generated."),
    "llamabridge_lifetime_prompt_seconds": ("prompt_seconds_total", "Seconds llama-server spent evaluating prompts."),
    "llamabridge_lifetime_generation_seconds": ("tokens_predicted_seconds_total", "Seconds llama-server spent generating."),
    "llamabridge_lifetime_decode_calls": ("n_decode_total", "llama_decode calls."),
}

UPSTREAM_EVENTS = {
    "llamabridge_lifetime_restarts": ("upstream_restarts", "llama-server restarts seen."),
    "llamabridge_lifetime_changes": ("upstream_changes", "Times another llama-server (model or build) answered at its URL."),
}
# The upstream label of what the store counted before it kept totals per llama-server, until
# LLAMA_URL's first llama-server takes it over at its first scrape.
UNRECORDED = "-"


class StoreCollector(Collector):
    def __init__(self, store: Store, job: ScrapeJob):
        self.store = store
        self.job = job

    def collect(self) -> Iterator:
        try:
            totals = self.store.totals()
            per_upstream = self.store.upstream_totals()
            counters = self.store.counters()
            latest = self.store.latest_sample()
        except sqlite3.Error as exc:
            log.warning("store unreadable, exporting nothing: %s", exc)
            return
        for name, (source, doc) in LIFETIME.items():
            yield CounterMetricFamily(name, doc, value=totals.get(source, 0.0))
        # Running totals kept in the store (never a count over rows that retention deletes).
        for name, key, doc in (
            ("llamabridge_lifetime_requests", "requests", "Requests through the proxy, since tracking began (llama-server counts none itself)."),
            ("llamabridge_lifetime_request_prompt_tokens", "request_prompt_tokens", "Uncached prompt tokens of requests through the proxy."),
            ("llamabridge_lifetime_request_cached_tokens", "request_cached_tokens", "Cached prompt tokens of requests through the proxy."),
            ("llamabridge_lifetime_request_generated_tokens", "request_generated_tokens", "Generated tokens of requests through the proxy."),
            ("llamabridge_lifetime_upstream_restarts", "upstream_restarts", "llama-server restarts seen."),
            ("llamabridge_lifetime_upstream_changes", "upstream_changes", "Times another llama-server (model or build) answered at LLAMA_URL."),
        ):
            yield CounterMetricFamily(name, doc, value=counters.get(key, 0.0))
        # The same lifetime totals per llama-server (LLAMA_URL may list several; every upstream the
        # store has counted stays here, so these always add up to the totals above).
        for name, (source, doc) in {**LIFETIME, **UPSTREAM_EVENTS}.items():
            family = CounterMetricFamily(name.replace("llamabridge_lifetime_", "llamabridge_upstream_lifetime_"),
                                         doc + " Per llama-server.", labels=["upstream"])
            for upstream, values in per_upstream.items():
                family.add_metric([upstream or UNRECORDED], values.get(source, 0.0))
            yield family
        errors = CounterMetricFamily("llamabridge_scrape_errors", "Failed reads of llama-server.", labels=["upstream"])
        success = GaugeMetricFamily("llamabridge_last_scrape_success_timestamp_seconds", "When llama-server was last read.",
                                    labels=["upstream"])
        up = GaugeMetricFamily("llamabridge_upstream_up", "1 if the last read of llama-server worked.", labels=["upstream"])
        problem = GaugeMetricFamily("llamabridge_upstream_error", "1 with the reason llama-server cannot be read "
                                    "(unreachable, unauthorized, http_error, not_metrics) while it cannot.",
                                    labels=["upstream", "reason"])
        for state in self.job.upstreams:
            errors.add_metric([state.url], state.errors)
            success.add_metric([state.url], state.last_success or 0)
            up.add_metric([state.url], 1 if state.up and self.job.standby is None else 0)
            if state.error is not None and not state.up:
                problem.add_metric([state.url, state.error.kind], 1)
        yield from (errors, success, up, problem)
        yield GaugeMetricFamily("llamabridge_collector_standby", "1 while another collector holds this store's lease "
                                "and this one waits to take over.", value=1 if self.job.standby else 0)
        now = {key: (latest or {}).get(key) for key in ("generation_tps", "prompt_tps", "busy_slots", "processing", "deferred", "cache_ratio")}
        for name, key, doc in (
            ("llamabridge_generation_tokens_per_second", "generation_tps", "Generation speed over the last interval."),
            ("llamabridge_prompt_tokens_per_second", "prompt_tps", "Prompt evaluation speed over the last interval."),
            ("llamabridge_busy_slots", "busy_slots", "Slots generating at the last read."),
            ("llamabridge_requests_processing", "processing", "Requests llama-server was processing at the last read."),
            ("llamabridge_requests_deferred", "deferred", "Requests llama-server had queued at the last read."),
            ("llamabridge_prompt_cache_hit_ratio", "cache_ratio", "Cached share of prompt tokens over the last interval."),
        ):
            yield GaugeMetricFamily(name, doc, value=now[key] if now[key] is not None else 0.0)
        context = GaugeMetricFamily("llamabridge_context_used_tokens", "Tokens in each slot's context at the last read.",
                                    labels=["upstream", "slot"])
        size = GaugeMetricFamily("llamabridge_context_size_tokens", "Context size of each slot.", labels=["upstream", "slot"])
        for slot in json.loads((latest or {}).get("context_used") or "[]"):
            # With one llama-server the slots do not say whose they are.
            labels = [str(slot.get("upstream") or self.job.upstreams[0].url), str(slot.get("slot"))]
            context.add_metric(labels, slot.get("used") or 0)
            size.add_metric(labels, slot.get("n_ctx") or 0)
        yield context
        yield size
