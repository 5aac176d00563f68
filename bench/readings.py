"""What the benchmarks read off running processes: llama-server's /metrics, and from Linux's
/proc a process's resident memory and its threads' scheduler times."""

from __future__ import annotations

from pathlib import Path

import requests

from collector.scrape import parse_metrics


def llama_metrics(llama_url: str, session: requests.Session | None = None, timeout: float = 10) -> tuple[dict, dict]:
    """llama-server's `/metrics` as (counters, gauges) without the `llamacpp:` prefix, parsed
    the way the collector parses them."""
    return parse_metrics((session or requests).get(llama_url + "/metrics", timeout=timeout).text)


def rss_parts(pid: int) -> list[float]:
    """Resident memory (MB) of a process, then of each of its children: gunicorn's arbiter, then
    its worker. gunicorn forks the worker from the arbiter's main thread, so that thread's
    `children` lists it. A process that just ended counts 0."""
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    parts = []
    for p in pids:
        kb = 0
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb = int(line.split()[1])
        except OSError:
            pass
        parts.append(kb / 1024)
    return parts


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn: arbiter and worker), in MB.

    The sum of each one's RSS, as `ps` shows them: pages the worker still shares with the
    arbiter it was forked from count in both."""
    return sum(rss_parts(pid))


def thread_times(pid: int) -> dict[int, tuple[int, int]]:
    """Every thread of a process: (ns it ran on a CPU, ns it was runnable but waited for one),
    from Linux's /proc/<pid>/task/<tid>/schedstat. Empty where that does not exist."""
    times = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            ran, waited, _ = map(int, (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended, or no schedstat on this kernel
        times[int(task.name)] = (ran, waited)
    return times
