"""`make bench`'s harness, run for a few rounds against the real llama-server.

The benchmark runs for many minutes and is not part of `make test`; these tests make sure it still
measures every path and reports every target, so a broken harness is found here rather than at
the end of a long run. They never assert a timing: speed is the benchmark's business.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench import host, load, report, stats, targets
from bench import overhead as bench_overhead
from tests.support import processes

pytestmark = pytest.mark.integration

PATHS = ("direct", "floor", "flask", "relay", "anthropic")


@pytest.fixture(scope="module")
def overhead(llama) -> dict:
    with processes.proxy(llama.url) as proxy, bench_overhead.floor(llama.url, "wsgi") as bare, bench_overhead.floor(llama.url, "flask") as flask:
        return bench_overhead.run(llama.url, proxy.url, {"wsgi": bare.url, "flask": flask.url}, rounds=3, stream_rounds=2,
                            llama_pid=llama.proc.pid)


def test_every_path_is_timed_in_the_same_rounds(overhead):
    assert {name: len(overhead["samples"][name]) for name in PATHS} == {name: 3 for name in PATHS}
    for key in ("relay_added_ms", "anthropic_added_ms", "floor_added_ms", "flask_added_ms"):
        assert set(overhead[key]) == {"p50", "p90", "p99"} and all(math.isfinite(v) for v in overhead[key].values())


def test_streams_are_measured_against_llama_servers_own_rate(overhead):
    for name in ("direct", "relay", "anthropic"):
        samples = overhead["stream_samples"][name]
        assert len(samples) == 2
        for ttft_ms, client_rate, tokens, server_rate, cpu_wait_ms in samples:
            # The JSON schema keeps every reply going; max_tokens ends each at the same token.
            assert tokens == bench_overhead.STREAM_TOKENS
            assert ttft_ms > 0 and client_rate > 0
            # llama-server's counters saw this stream: its rate is a real rate, near the client's.
            assert 0.5 < client_rate / server_rate < 2
            # The scheduler's account of its generating thread: a wait, shorter than the stream.
            assert 0 <= cpu_wait_ms < tokens / server_rate * 1000
        stream = overhead["stream"][name]
        assert 0 < stream["generating_ms"] and 0 <= stream["server_cpu_wait_ms"] < stream["generating_ms"]
    for name in ("relay", "anthropic"):
        for kind in ("throughput", "delivered", "server_rate"):
            assert 0.5 < overhead[f"{name}_stream_{kind}_ratio"] < 2


def test_memory_is_the_proxys_arbiter_and_worker_and_the_arbiter_never_loads_the_app(llama):
    with processes.proxy(llama.url) as proxy:
        idle = load.idle_memory(proxy.url, {"proxy": proxy.proc.pid})
        arbiter, worker = idle["proxy_parts"]  # exactly two processes: gunicorn's arbiter and its one worker
        assert idle["proxy"] == arbiter + worker
        assert arbiter > 0 and worker > 0
        # The arbiter only supervises: the app's compiled modules are mapped in the worker alone.
        (worker_pid,) = map(int, Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split())
        assert "orjson" in Path(f"/proc/{worker_pid}/maps").read_text()
        assert "orjson" not in Path(f"/proc/{proxy.proc.pid}/maps").read_text()


def test_idle_penalty_times_flask_both_ways():
    idle = host.idle_penalty(rounds=20, idle_s=0.001)
    assert idle["idle_ms"] == 1.0
    assert idle["flask_request_hot_us"] > 0 and idle["flask_request_after_idle_us"] > 0


def test_the_table_reports_every_target_and_names_the_missed(overhead):
    queue = {"p50": 0.0, "p90": 0.0, "p99": 0.0, "n": 1}
    results = {
        "date": "2026-12-01 00:00 UTC", "model": "tiny.gguf", "overhead": overhead, "rss_mb": {"proxy": 90.0, "collector": 80.0},
        "rss_idle_mb": {"proxy": 61.4, "proxy_parts": [26.0, 35.4], "collector": 50.0, "collector_parts": [20.0, 30.0]},
        "rss_peak_parts_mb": {"proxy": [26.0, 64.0], "collector": [20.0, 60.0]},
        "machine": {**host.describe(), "idle": host.idle_penalty(rounds=5, idle_s=0.001)},
        "concurrency": {"clients": 50, "seconds": 120.0, "requests": 3, "by_kind": {"main": 1, "title": 1, "count_tokens": 1},
                        "failed": 1, "failures": ["main -1"], "max_upstream_processing": 1.0, "max_upstream_deferred": 0.0,
                        "queue_wait_ms": {"main": queue, "title": queue}, "background_local_ms": {"p50": 0.3, "p99": 2.0, "n": 1},
                        "background_after_start_ms": {"p50": 0.3, "p99": 1.5, "n": 1},
                        "title_client_ms": {"p50": 1.0, "p99": 2.0}, "count_tokens_ms": {"p50": 0.4, "p99": 90.0, "max": 140.0, "n": 1}},
        "cache": {"turns": ["session 1 turn 1", "session 2 turn 1"], "direct": [23000.0, 23000.0], "proxy": [23000.0, 12.0],
                  "direct_total": 46000.0, "proxy_total": 23012.0, "second_session_saving": 0.999, "turns_worse_than_direct": 0},
        "persist": {"turns": ["session 1 turn 2", "session 2 turn 2", "session 3 turn 1"], "direct": [23187.0, 23190.0, 23170.0],
                    "proxy": [23.0, 23.0, 15.0], "restored": [23146, 23151, 23168], "direct_ttft_ms": [14100.0, 13900.0, 14800.0],
                    "proxy_ttft_ms": [830.0, 820.0, 590.0], "direct_in_slot_ttft_ms": 700.0, "in_slot_ttft_ms": 850.0,
                    "continuing_saving": 0.999, "new_session_saving": 0.999,
                    "saves": [{"tokens": 23146, "mb": 12.2, "ms": 20.0}, {"tokens": 23620, "mb": 12.5, "ms": 11.0}],
                    "restores": [{"tokens": 23146, "ms": 20.0}], "save_ms_per_1k_tokens": 0.71, "save_mb_per_1k_tokens": 0.527,
                    "restore_ms_per_1k_tokens": 0.82, "rounds": [{}] * 20, "rounds_overlapped": 4, "max_wait_ms": 6.0,
                    "max_save_ms": 35.2, "wait_over_save": 6.0 / 35.2},
        "upstreams": {"sessions": 8, "turns_per_session": 3, "max_tokens": 32, "slots": 8, "speedup": 1.8,
                      "one": {"turns": 24, "seconds": 60.0, "turns_per_minute": 24.0, "upstream_turns": {"http://a": 24},
                              "min_cached_share": 0.998, "mean_cached_share": 0.998, "sessions_finished": 8, "failures": []},
                      "two": {"turns": 24, "seconds": 33.3, "turns_per_minute": 43.2, "upstream_turns": {"http://a": 12, "http://b": 12},
                              "min_cached_share": 0.998, "mean_cached_share": 0.998, "sessions_finished": 8, "failures": []},
                      "failover": {"turns": 24, "seconds": 40.0, "turns_per_minute": 36.0, "upstream_turns": {"http://a": 5, "http://b": 19},
                                   "min_cached_share": 0.0, "mean_cached_share": 0.93, "sessions_finished": 8, "failed_before_answer": 1,
                                   "stopped": {"url": "http://a", "at_turns": 8},
                                   "failures": [{"session": "upstreams-failover-6", "turn": 1, "status": 200, "answering": False,
                                                 "error": "event: error the connection to llama-server broke mid-response",
                                                 "upstream": "http://a", "logged_status": 502, "logged_error": "broke mid-response"}]}},
        "collector": {"scrape_wall_ms_p50": 3.0, "scrape_wall_ms_p99": 5.0, "scrape_cpu_ms_mean": 2.0, "sqlite_bytes_per_day": 260000.0,
                      "sqlite_bytes_month": 9.2e6, "api_ms": {"/api/totals": {"p50": 1.0, "p99": 2.0}}},
    }
    # Three rounds give no interval; a real run's would sit here.
    assert all(span is None for span in overhead["intervals"].values()) and set(overhead["intervals"]) <= set(targets.TARGETS)
    results["overhead"] = dict(overhead, intervals={"relay_stream_throughput_ratio": (0.95, 1.01), "relay_added_p50_ms": (1.5, 1.9)},
                               anthropic_stream_added_ttft_ms=6.1, anthropic_stream_added_ttft_interval_ms=(-3.04, 12.0))
    results["checks"] = targets.checks(results)
    text = report.table(results)
    for name in targets.TARGETS:
        assert f"| {name} " in text
    # One failed request under load is a missed target, and the table says so.
    assert "| concurrency_failed <= 0 | 1.000 |  | **MISSED** |" in text
    assert "| cache_second_session_saving >= 0.9 | 0.999 |  | met |" in text
    # Memory: idle and at the peak, each split into gunicorn's arbiter and worker; idle is over its 60 MB.
    assert "the proxy 61 MB (arbiter 26 + worker 35) idle" in text and "90 MB (arbiter 26 + worker 64) at the load's peak" in text
    assert "| proxy_rss_idle_mb <= 60.0 | 61.400 |  | **MISSED** |" in text
    assert "| proxy_rss_peak_mb <= 120.0 | 90.000 |  | met |" in text
    # An interval that holds the target says the run cannot tell; one that does not, says nothing more.
    assert "| 0.950 to 1.010 (holds the target: this run cannot tell) |" in text
    assert "| 1.500 to 1.900 |" in text
    # Background requests after the start burst are reported beside the target's figure.
    assert "after the first 2 s, when all sessions start at once: p99 1.5 ms of 1." in text
    # Token counts have no target either; the slowest is printed, since a stall shows there first.
    assert "Token counts (count_tokens, exact, then cached): p50 0.4 ms, p99 90.0 ms, slowest 140 ms in the proxy." in text
    # The added time to first token has no target, but its interval is printed with it.
    assert "(+6.1; -3.0 to +12.0) |" in text
    # After restarts: tokens evaluated with those restored beside them, and what a save costs.
    assert "| prompt tokens evaluated, through llamabridge (tokens restored from disk) | 23 (23146) | 23 (23151) | 15 (23168) |" in text
    assert "20 rounds: 4 arrived while the save ran; the longest waited 6.0 ms; the longest save of those rounds took 35.2 ms." in text
    assert "| persist_wait_over_save <= 1.0 | 0.170 |  | met |" in text
    # Several llama-servers: the rate and cached share on one and on two, and every failed
    # request of the run that stopped one, with whether its answer had started.
    assert "| two | 24 | 33.3 | 43.2 | 12, 12 | 99.8% / 99.8% |" in text
    assert "| upstreams-failover-6 | 1 | 200 | event: error the connection to llama-server broke mid-response | no | http://a | 502 / broke mid-response |" in text
    assert "| upstreams_failover_failed_before_answer <= 0 | 1.000 |  | **MISSED** |" in text
    assert "| upstreams_turns_per_minute_ratio >= 1.5 | 1.800 |  | met |" in text
    # No round that overlapped a save measured nothing: missed, and said so. Run alone, the
    # phase reports its own targets only.
    results["persist"].update(rounds_overlapped=0, max_wait_ms=0.0, wait_over_save=float("inf"))
    alone = {"date": results["date"], "model": results["model"], "persist": results["persist"]}
    alone["checks"] = targets.checks(alone, only="persist")
    text = report.phase_table(alone, "persist")
    assert "no wait to measure" in text and "| persist_wait_over_save <= 1.0 | inf |  | **MISSED** |" in text
    assert [name for name, *_ in alone["checks"]] == [name for name in targets.TARGETS if name.startswith("persist_")]
    alone = {"date": results["date"], "model": results["model"], "upstreams": results["upstreams"]}
    alone["checks"] = targets.checks(alone, only="upstreams")
    assert [name for name, *_ in alone["checks"]] == [name for name in targets.TARGETS if name.startswith("upstreams_")]
    assert "Two llama-servers complete 1.80x the main turns per minute of one." in report.phase_table(alone, "upstreams")
    # A value just short of its target is shown with the digits that say so.
    results["cache"]["second_session_saving"] = 0.89996
    results["checks"] = targets.checks(results)
    assert "| cache_second_session_saving >= 0.9 | 0.89996 |  | **MISSED** |" in report.table(results)


def test_intervals_hold_the_truth_and_narrow_with_rounds():
    rng = np.random.default_rng(7)

    def span(rounds: int) -> tuple[float, float]:
        direct = rng.normal(250, 30, rounds)
        through = direct * rng.normal(0.99, 0.08, rounds)  # a 1% slower relay, in noise like this VM's
        found = stats.interval(stats.median_ratio, through, direct)
        assert found is not None, f"{rounds} rounds are too few for an interval"
        return found

    short, long = span(40), span(1000)
    assert short[0] < 0.99 < short[1] and long[0] < 0.99 < long[1]
    assert long[1] - long[0] < (short[1] - short[0]) / 3
    assert long[1] < 1.0  # a thousand rounds tell a 1% slowdown apart from none
    assert stats.interval(stats.median_ratio, [1.0] * 9, [1.0] * 9) is None  # too few rounds to say

    direct = rng.normal(7, 1, 600)
    low, high = stats.interval(stats.added_percentile(50), direct + 2, direct)
    assert low <= 2 <= high and high - low < 0.01  # the same shift every round: no doubt about it


def test_point_estimates_are_the_statistics_their_intervals_resample():
    direct = [6.0, 7.0, 8.0, 9.0, 10.0]
    assert stats.estimate(stats.added_percentile(50), [x + 1.5 for x in direct], direct) == 1.5
    assert stats.estimate(stats.added_percentile(99), [1, 2, 3, 4, 100], [1, 2, 3, 4, 5]) == pytest.approx(95 * 0.96)
    # The median of the per-round ratios, not the ratio of the medians (1.0 here).
    assert stats.estimate(stats.median_ratio, [2.0, 1.0, 3.0], [1.0, 2.0, 1.0]) == 2.0
    # The median of the per-round differences, not the difference of the medians (0 here).
    assert stats.estimate(stats.median_difference, [10.0, 30.0, 31.0], [30.0, 10.0, 30.0]) == 1.0
