"""The overhead benchmark: what going through the proxy adds to a request, against direct
llama-server in the same interleaved rounds.

- 1-token completions, each round to five targets in a fresh random order: llama-server
  directly, bench/floor.py's bare WSGI relay and its one-route Flask relay (both under the
  proxy's own gunicorn settings), the proxy's OpenAI relay and its Anthropic translation.
  Reported as added latency at p50, p90 and p99 against direct.
- Streamed completions of exactly STREAM_TOKENS tokens, each round to direct, the relay and the
  translation in a fresh random order: time to first token, tokens/s at the client, the rate
  llama-server generated the same stream at (its own counters), and how long its generating
  thread waited for a CPU meanwhile.

Every comparison is made within a round and then summarised over the rounds, and each target
gets a 95% bootstrap interval (bench/stats.py).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.readings import llama_metrics, thread_times
from bench.stats import (
    added_percentile,
    estimate,
    interval,
    median_difference,
    median_ratio,
)
from bench.stats import percentile as pct
from tests.support import processes

ROOT = Path(__file__).resolve().parents[1]
# Streamed replies are exactly STREAM_TOKENS long: llama-server's grammar holds the reply to a JSON
# array of 256 digits (more tokens than that, with the commas), so the tiny model cannot end it
# early, and max_tokens cuts every one at the same token.
STREAM_TOKENS = 256
LONG_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 256, "maxItems": 256}
# Streamed rounds by default. llama-server's own rate varies from one stream to the next, so the
# throughput ratio needs this many rounds for its interval to decide a 2% target in most runs;
# bench/HISTORY.md ("How many streamed rounds decide the throughput target") has the runs that set it.
STREAM_ROUNDS = 160
WARMUP_ROUNDS = 20  # 1-token rounds run first and discarded
STREAM_WARMUP_ROUNDS = 2

SHORT_OPENAI: dict[str, Any] = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
SHORT_ANTHROPIC: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
LONG_OPENAI: dict[str, Any] = {"model": "m", "max_tokens": STREAM_TOKENS, "stream": True, "stream_options": {"include_usage": True},
                               "messages": [{"role": "user", "content": "digits"}],
                               "response_format": {"type": "json_schema", "json_schema": {"name": "digits", "schema": LONG_SCHEMA}}}
LONG_ANTHROPIC: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": STREAM_TOKENS, "stream": True,
                                  "messages": [{"role": "user", "content": "digits"}],
                                  "output_config": {"format": {"type": "json_schema", "schema": LONG_SCHEMA}}}


def floor(llama_url: str, app: str) -> processes.Service:
    """bench/floor.py: a bare relay (app "wsgi", or "flask") under the proxy's gunicorn settings."""
    env = {**os.environ, "LLAMA_URL": llama_url, "FLOOR_APP": app, "FLOOR_PORT": "0"}
    return processes.Service(f"floor-{app}", [sys.executable, "-m", "bench.floor"], r"Listening at: http://127\.0\.0\.1:(?P<port>\d+)",
                             env=env, health_path="/", cwd=ROOT)


def run(llama_url: str, proxy_url: str, floor_urls: dict[str, str], rounds: int, stream_rounds: int,
        llama_pid: int | None = None) -> dict:
    """Both halves of the benchmark; `floor_urls` maps "wsgi" and "flask" to bench/floor.py's two
    relays, and `llama_pid` (if given) lets it read llama-server's threads' scheduler times."""
    session = requests.Session()
    times = latency_rounds(session, llama_url, proxy_url, floor_urls, rounds)

    def added(name: str) -> dict:
        return {f"p{q}": estimate(added_percentile(q), times[name], times["direct"]) for q in (50, 90, 99)}

    result = {"latency_ms": {name: {f"p{q}": pct(v, q) for q in (50, 90, 99)} for name, v in times.items()},
              "relay_added_ms": added("relay"), "anthropic_added_ms": added("anthropic"), "floor_added_ms": added("floor"),
              "flask_added_ms": added("flask"), "samples": times}
    streams = streamed_rounds(session, llama_url, proxy_url, stream_rounds, llama_pid)
    result.update(stream_summary(streams))
    # How far another run of the same length could land from these (keys as in bench/targets.py).
    result["intervals"] = {
        "relay_added_p50_ms": interval(added_percentile(50), times["relay"], times["direct"]),
        "relay_added_p99_ms": interval(added_percentile(99), times["relay"], times["direct"]),
        "anthropic_added_p50_ms": interval(added_percentile(50), times["anthropic"], times["direct"]),
        **{f"{name}_stream_throughput_ratio": interval(median_ratio, _column(streams, name, 1), _column(streams, "direct", 1))
           for name in ("relay", "anthropic")},
    }
    return result


# ---------------------------------------------------------------- 1-token completions


def latency_rounds(session: requests.Session, llama_url: str, proxy_url: str, floor_urls: dict[str, str],
                   rounds: int) -> dict[str, list[float]]:
    """ms per 1-token completion, per target, over `rounds` rounds after the warm-up ones."""
    calls = {
        "direct": lambda: session.post(llama_url + "/v1/chat/completions", json=SHORT_OPENAI, timeout=30),
        "floor": lambda: session.post(floor_urls["wsgi"] + "/v1/chat/completions", json=SHORT_OPENAI, timeout=30),
        "flask": lambda: session.post(floor_urls["flask"] + "/v1/chat/completions", json=SHORT_OPENAI, timeout=30),
        "relay": lambda: session.post(proxy_url + "/v1/chat/completions", json=SHORT_OPENAI, timeout=30),
        "anthropic": lambda: session.post(proxy_url + "/v1/messages", json=SHORT_ANTHROPIC, timeout=30),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for i in range(rounds + WARMUP_ROUNDS):
        random.shuffle(order)  # interleaved, in a different order each round
        for name in order:
            start = time.perf_counter()
            resp = calls[name]()
            took = time.perf_counter() - start
            assert resp.status_code == 200, (name, resp.status_code, resp.text[:300])
            if i >= WARMUP_ROUNDS:
                times[name].append(took * 1000)
    return times


# ---------------------------------------------------------------- streamed completions


def streamed_rounds(session: requests.Session, llama_url: str, proxy_url: str, rounds: int,
                   llama_pid: int | None) -> dict[str, list[tuple]]:
    """Per target, one tuple per round: (time to first token ms, tokens/s at the client, tokens,
    tokens/s llama-server generated it at, ms its generating thread waited for a CPU)."""
    targets = {"direct": (llama_url + "/v1/chat/completions", LONG_OPENAI, False),
               "relay": (proxy_url + "/v1/chat/completions", LONG_OPENAI, False),
               "anthropic": (proxy_url + "/v1/messages", LONG_ANTHROPIC, True)}
    streams: dict[str, list[tuple]] = {name: [] for name in targets}
    order = list(targets)
    for i in range(rounds + STREAM_WARMUP_ROUNDS):
        random.shuffle(order)
        for name in order:
            before = _generated(session, llama_url)
            threads = thread_times(llama_pid) if llama_pid else {}
            measured = _stream(session, *targets[name])
            rate = _server_rate(session, llama_url, before, measured[2])
            waited = _cpu_wait(llama_pid, threads)
            if i >= STREAM_WARMUP_ROUNDS:
                streams[name].append((*measured, rate, waited))
    return streams


def _stream(session: requests.Session, url: str, body: dict, anthropic: bool) -> tuple[float, float, int]:
    """(ms to the first token, tokens/s from there to the end, tokens) for one streamed answer."""
    start = time.perf_counter()
    first = None
    tokens = 0
    # A connection of its own for every stream, direct or proxied alike: llama-server closes
    # its connection after each streamed answer while announcing keep-alive, and the next
    # request that picked it from the pool before the close arrived would fail.
    with session.post(url, json=body, stream=True, timeout=120, headers={"Connection": "close"}) as resp:
        assert resp.status_code == 200, resp.text[:300]
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if anthropic:
                if event.get("type") == "content_block_delta" and first is None:
                    first = time.perf_counter()
                if event.get("type") == "message_delta":
                    tokens = event["usage"]["output_tokens"]
            else:
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content") and first is None:
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    assert first is not None, f"{url} streamed no token"
    return (first - start) * 1000, tokens / (end - first), tokens


def _generated(session: requests.Session, llama_url: str) -> tuple[float, float]:
    """llama-server's own counters: tokens generated so far, and seconds spent generating them."""
    counters, _ = llama_metrics(llama_url, session)
    return counters["tokens_predicted_total"], counters["tokens_predicted_seconds_total"]


def _server_rate(session: requests.Session, llama_url: str, before: tuple[float, float], tokens: int) -> float:
    """The tokens/s llama-server itself generated this stream at, from its counters (it may
    count the stream a moment after the client has read its end)."""
    deadline = time.monotonic() + 5
    while True:
        after = _generated(session, llama_url)
        if after[0] - before[0] >= tokens or time.monotonic() > deadline:
            return (after[0] - before[0]) / (after[1] - before[1])


def _cpu_wait(llama_pid: int | None, before: dict[int, tuple[int, int]]) -> float:
    """ms that llama-server's generating thread (the one that ran most since `before`) spent
    runnable but waiting for a CPU: what the processes sharing the CPU with it took from
    it. NaN without /proc schedstat."""
    after = thread_times(llama_pid) if llama_pid else {}
    if not after:
        return float("nan")
    tid = max(after, key=lambda t: after[t][0] - before.get(t, (0, 0))[0])
    return (after[tid][1] - before.get(tid, (0, 0))[1]) / 1e6


def _column(streams: dict[str, list[tuple]], name: str, i: int) -> list[float]:
    return [m[i] for m in streams[name]]


def stream_summary(streams: dict[str, list[tuple]]) -> dict:
    """Medians per target, and the proxy's paths against direct.

    Paired by round: each round streams once to every target, back to back, so the machine's
    speed drifts less within a round than across the run. The median of the per-round ratio
    (and difference) cancels that drift better than a ratio of the two medians.

    The throughput ratio (the target) is the rate the client sees, through the proxy over
    direct. llama-server's own speed varies from one stream to the next, so it is split in two:
    the share of the rate llama-server generated a stream at (its counters, read before and
    after) that reached the client, through the proxy over direct (what the relay itself costs;
    steady), and llama-server's own rate through the proxy over direct (whether the proxy,
    sharing the CPU, slowed llama-server down; as noisy as the rate itself). For that second
    part, the scheduler's account says how much time llama-server's generating thread spent
    waiting for a CPU during each stream.
    """
    # The wait is a mean: a few long preemptions are what it costs, and a median would hide them.
    result: dict = {"stream": {name: {"ttft_ms": statistics.median(m[0] for m in v), "tokens_per_s": statistics.median(m[1] for m in v),
                                      "tokens": statistics.median(m[2] for m in v),
                                      "server_tokens_per_s": statistics.median(m[3] for m in v),
                                      "server_cpu_wait_ms": statistics.fmean(m[4] for m in v),
                                      "generating_ms": statistics.fmean(m[2] / m[3] * 1000 for m in v)}
                               for name, v in streams.items()},
                    "stream_samples": streams}

    def column(name: str, i: int) -> list[float]:
        return _column(streams, name, i)

    def share(name: str) -> list[float]:  # of llama-server's rate, what reached the client
        return [m[1] / m[3] for m in streams[name]]

    for name in ("relay", "anthropic"):
        # No target, but an interval: llama-server's own time to first token for these
        # grammar-bound streams spreads widely, direct as much as proxied, so a median of
        # differences over few rounds can land several ms from zero by chance, and the table
        # should say when it has.
        result[f"{name}_stream_added_ttft_ms"] = estimate(median_difference, column(name, 0), column("direct", 0))
        result[f"{name}_stream_added_ttft_interval_ms"] = interval(median_difference, column(name, 0), column("direct", 0))
        result[f"{name}_stream_throughput_ratio"] = estimate(median_ratio, column(name, 1), column("direct", 1))
        result[f"{name}_stream_delivered_ratio"] = estimate(median_ratio, share(name), share("direct"))
        result[f"{name}_stream_server_rate_ratio"] = estimate(median_ratio, column(name, 3), column("direct", 3))
    return result
