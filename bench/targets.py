"""`make bench`'s targets, and the verdict on each from a run's results."""

from __future__ import annotations

from collections.abc import Callable

# name: (operator, limit). The 1-token and streamed targets come with a 95% interval
# (bench/overhead.py's "intervals", same keys); the others are counts or single readings.
TARGETS = {
    "relay_added_p50_ms": ("<=", 1.0),
    "relay_added_p99_ms": ("<=", 3.0),
    "anthropic_added_p50_ms": ("<=", 2.0),
    "relay_stream_throughput_ratio": (">=", 0.98),
    "anthropic_stream_throughput_ratio": (">=", 0.98),
    "concurrency_failed": ("<=", 0),
    "concurrency_max_upstream_processing": ("<=", 1),
    "concurrency_max_upstream_deferred": ("<=", 0),
    "background_p99_ms": ("<", 20.0),
    # gunicorn's arbiter and its worker together, as `ps` or a container's memory use shows them.
    "proxy_rss_idle_mb": ("<=", 60.0),
    "proxy_rss_peak_mb": ("<=", 120.0),
    "cache_second_session_saving": (">=", 0.90),
    "cache_turns_worse_than_direct": ("<=", 0),
    "persist_continuing_saving": (">=", 0.95),
    "persist_new_session_saving": (">=", 0.90),
    "persist_wait_over_save": ("<=", 1.0),
    "upstreams_one_cached_share": (">=", 0.95),
    "upstreams_two_cached_share": (">=", 0.95),
    "upstreams_turns_per_minute_ratio": (">=", 1.5),
    "upstreams_failover_failed_before_answer": ("<=", 0),
    "upstreams_failover_sessions_unfinished": ("<=", 0),
}

# Each target's value in a run's results.
VALUES: dict[str, Callable[[dict], float]] = {
    "relay_added_p50_ms": lambda r: r["overhead"]["relay_added_ms"]["p50"],
    "relay_added_p99_ms": lambda r: r["overhead"]["relay_added_ms"]["p99"],
    "anthropic_added_p50_ms": lambda r: r["overhead"]["anthropic_added_ms"]["p50"],
    "relay_stream_throughput_ratio": lambda r: r["overhead"]["relay_stream_throughput_ratio"],
    "anthropic_stream_throughput_ratio": lambda r: r["overhead"]["anthropic_stream_throughput_ratio"],
    "concurrency_failed": lambda r: r["concurrency"]["failed"],
    "concurrency_max_upstream_processing": lambda r: r["concurrency"]["max_upstream_processing"],
    "concurrency_max_upstream_deferred": lambda r: r["concurrency"]["max_upstream_deferred"],
    "background_p99_ms": lambda r: r["concurrency"]["background_local_ms"]["p99"],
    "proxy_rss_idle_mb": lambda r: r["rss_idle_mb"]["proxy"],
    "proxy_rss_peak_mb": lambda r: r["rss_mb"]["proxy"],
    "cache_second_session_saving": lambda r: r["cache"]["second_session_saving"],
    "cache_turns_worse_than_direct": lambda r: r["cache"]["turns_worse_than_direct"],
    "persist_continuing_saving": lambda r: r["persist"]["continuing_saving"],
    "persist_new_session_saving": lambda r: r["persist"]["new_session_saving"],
    "persist_wait_over_save": lambda r: r["persist"]["wait_over_save"],
    "upstreams_one_cached_share": lambda r: r["upstreams"]["one"]["min_cached_share"],
    "upstreams_two_cached_share": lambda r: r["upstreams"]["two"]["min_cached_share"],
    "upstreams_turns_per_minute_ratio": lambda r: r["upstreams"]["speedup"],
    "upstreams_failover_failed_before_answer": lambda r: r["upstreams"]["failover"]["failed_before_answer"],
    "upstreams_failover_sessions_unfinished": lambda r: r["upstreams"]["sessions"] - r["upstreams"]["failover"]["sessions_finished"],
}


def checks(results: dict, only: str | None = None) -> list[tuple[str, float, str, float, bool, tuple[float, float] | None]]:
    """(target, value, operator, limit, met, 95% interval of the value or None) for every target,
    or with `only` (a phase run alone: "cache", "persist", "upstreams") for that phase's."""
    intervals = (results.get("overhead") or {}).get("intervals") or {}
    out = []
    for name, (op, target) in TARGETS.items():
        if only is not None and not name.startswith(only + "_"):
            continue
        value = VALUES[name](results)
        ok = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
        out.append((name, value, op, target, ok, intervals.get(name)))
    return out


def undecided(limit: float, span: tuple[float, float] | None) -> bool:
    """Whether the run could as well have landed on the other side of the limit."""
    return span is not None and span[0] <= limit <= span[1]
