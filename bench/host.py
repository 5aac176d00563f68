"""The machine a benchmark ran on: what it is, and how much colder its CPU caches run after a pause.

Both go into the results beside the timings, since on a shared machine absolute milliseconds
move with the host and its load; ratios measured in the same run do not.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path


def describe() -> dict:
    """CPU model, cores, memory (GB), Python and kernel versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem, 1), "python": platform.python_version(),
            "kernel": platform.release()}


def idle_penalty(rounds: int = 400, idle_s: float = 0.006) -> dict:
    """How much slower the same Python code runs right after the CPU idled than back to back.

    One request through bench/floor.py's Flask app (in-process, its GET route: Flask's own
    request handling and nothing else), timed back to back and after `idle_s` of sleep, about
    as long as a 1-token completion on a small model keeps the proxy waiting for llama-server.
    Between one proxied request and the next the proxy always idles like that; if its code and data have left the
    CPU caches meanwhile (other processes, or other tenants of a shared VM), every layer costs
    several times its hot CPU time. This number says how strongly that holds on the machine the
    bench ran on.
    """
    from werkzeug.datastructures import Headers
    from werkzeug.test import EnvironBuilder

    from bench.floor import flask_app

    app = flask_app().wsgi_app

    def one() -> float:
        environ = EnvironBuilder(path="/", headers=Headers({"User-Agent": "python-requests", "Accept": "*/*"})).get_environ()
        start = time.perf_counter()
        for _ in app(environ, lambda status, headers, exc_info=None: None):
            pass
        return (time.perf_counter() - start) * 1e6

    for _ in range(50):
        one()
    hot = statistics.median(one() for _ in range(rounds))
    after_idle = []
    for _ in range(rounds):
        time.sleep(idle_s)
        after_idle.append(one())
    return {"idle_ms": idle_s * 1000, "flask_request_hot_us": hot, "flask_request_after_idle_us": statistics.median(after_idle)}
