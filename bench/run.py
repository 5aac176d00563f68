"""`make bench`: what the proxy costs, what it saves, and how it holds under load.

Everything is measured side by side in one run, against a real llama-server (the tiny generated
model unless LLAMA_MODEL names a GGUF) started here with one slot:

  overhead     bench/overhead.py: the same requests, interleaved, straight to llama-server and
               through the proxy: 1-token completions (added latency p50/p90/p99) and streamed
               256-token completions (added time to first token, throughput as a ratio of
               direct), for the OpenAI relay and the Anthropic translation. The 1-token
               requests also go through bench/floor.py, a bare relay under the same gunicorn
               settings, as plain WSGI and as a one-route Flask app: what the server model and
               Flask add by themselves on this machine. Then bench/host.py: how much slower
               Flask's request handling runs after the CPU idled a few milliseconds than back
               to back.
  concurrency  bench/load.py: BENCH_CLIENTS (50) Claude Code-shaped clients (main turns, session
               titles, count_tokens bursts) for BENCH_SECONDS (120): failures, llama-server's
               concurrency, queue wait per class, how fast background requests are answered;
               the proxy's and the collector's resident memory idle (after start-up and a
               warm-up request) and at the load's peak.
  cache        bench/cache.py: a two-session Claude Code conversation from the recorded session
               (bench/recorded.py), replayed straight to llama-server's native /v1/messages and
               through the proxy, each on a fresh llama-server: prompt tokens evaluated per turn.
  persist      bench/persist.py: the same sessions and a third across llama-server restarts,
               direct and through the proxy saving slots to disk: prompt tokens evaluated and
               time to first token per turn after a restart; what a save costs in time, disk
               and in the wait of a turn that arrives during one.
  upstreams    bench/upstreams.py: eight Claude Code-shaped sessions at once through the proxy
               on one llama-server and on two (LLAMA_URL=a,b): main turns per minute and the
               share of each later turn taken from llama-server's cache; then on two, one
               stopped midway: which requests failed, and whether every session finished.
  collector    bench/collector_bench.py: time and CPU per scrape, SQLite growth per simulated
               day, dashboard API latency with a month of data.

It prints a table (bench/report.py), writes bench/results/latest.json, latest.md and latest.png
(bench/plot.py), and exits 1 if a target (bench/targets.py) is missed, saying which. `--only cache`, `--only persist`
or `--only upstreams` runs that phase alone (on llama-servers of its own), prints its part of the table and targets and
writes bench/results/<phase>.json. Every target
measured from sampled rounds comes with a 95% bootstrap interval (bench/stats.py), and the table
says when that interval holds the target: such a run cannot tell met from missed, however the
point estimate fell.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script (`python bench/run.py`), as `make bench` does

from bench import cache, collector_bench, host, load, overhead, persist, upstreams
from bench.plot import plot
from bench.recorded import capture_messages
from bench.report import phase_table, table
from bench.targets import checks, undecided
from proxy.config import Settings
from tests.support import processes

RESULTS = ROOT / "bench" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "1000")))
    parser.add_argument("--stream-rounds", type=int, default=int(os.environ.get("BENCH_STREAM_ROUNDS", overhead.STREAM_ROUNDS)))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("BENCH_CLIENTS", "50")))
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "120")))
    parser.add_argument("--persist-rounds", type=int, default=int(os.environ.get("BENCH_PERSIST_ROUNDS", persist.ROUNDS)))
    parser.add_argument("--only", choices=["cache", "persist", "upstreams"], help="run this phase alone")
    args = parser.parse_args()
    binary = os.environ.get("LLAMA_SERVER_BIN") or subprocess.run(["bash", "llama/build.sh"], cwd=ROOT, capture_output=True,
                                                                  text=True, check=True).stdout.strip().splitlines()[-1]
    model = os.environ.get("LLAMA_MODEL") or subprocess.run([sys.executable, "llama/tiny_model.py"], cwd=ROOT, capture_output=True,
                                                            text=True, check=True).stdout.strip().splitlines()[-1]
    os.environ["LLAMABRIDGE_ENV_FILE"] = os.devnull  # measure the defaults, not someone's .env
    RESULTS.mkdir(parents=True, exist_ok=True)
    messages = capture_messages()
    results: dict = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": host.describe(),
                     "model": Path(model).name, "llama_server": binary}
    if args.only:
        return only(args.only, results, binary, model, messages[1], args)
    work = Path(tempfile.mkdtemp(prefix="llamabridge-bench-"))
    db = str(work / "bench.db")
    print(f"llama-server {binary}\nmodel {model}\nwork dir {work}", flush=True)
    with processes.llama_server(binary, model, ctx=32768) as llama, \
            processes.proxy(llama.url, DB_PATH=db, PROXY_THREADS=str(Settings.threads)) as proxy, \
            processes.collector(llama.url, db, interval=10) as collector:
        # The product's defaults (its proxy threads, a scrape every 10 s), not the test suite's.
        assert llama.proc is not None and proxy.proc is not None and collector.proc is not None, "started by `with`"
        services = {"proxy": proxy.proc.pid, "collector": collector.proc.pid}
        results["rss_idle_mb"] = load.idle_memory(proxy.url, services)
        print(f"overhead: {args.rounds} interleaved rounds, {args.stream_rounds} streamed", flush=True)
        with overhead.floor(llama.url, "wsgi") as bare, overhead.floor(llama.url, "flask") as flask:
            results["overhead"] = overhead.run(llama.url, proxy.url, {"wsgi": bare.url, "flask": flask.url}, args.rounds,
                                               args.stream_rounds, llama_pid=llama.proc.pid)
        results["machine"]["idle"] = host.idle_penalty()  # right after, in the same phase of a shared machine
        print(f"concurrency: {args.clients} clients for {args.seconds:.0f} s", flush=True)
        sampler = load.Sampler(llama.url, services)
        sampler.start()
        results["concurrency"] = load.run(llama.url, proxy.url, db, args.clients, args.seconds, messages[0], messages[1], sampler)
        sampler.stop.set()
        results["rss_mb"] = sampler.peak_rss
        results["rss_peak_parts_mb"] = sampler.peak_parts
        print("collector", flush=True)
        results["collector"] = collector_bench.run(llama.url, work / "collector")
    print("prompt cache: two sessions, direct then through the proxy, each on a fresh llama-server", flush=True)
    results["cache"] = cache.run(binary, model, messages[1])
    print(f"prompt cache across restarts: {args.persist_rounds} rounds of turns during a save", flush=True)
    results["persist"] = persist.run(binary, model, messages[1], args.persist_rounds)
    print("several llama-servers: sessions on one and on two, then one of two stopped midway", flush=True)
    results["upstreams"] = upstreams.run(binary, model, messages[1])
    results["checks"] = checks(results)
    text = table(results)
    print("\n" + text)
    (RESULTS / "latest.md").write_text(text + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, RESULTS / "latest.png")
    print(f"\nwrote {RESULTS / 'latest.json'}, latest.md and latest.png")
    return verdict(results["checks"])


def only(phase: str, results: dict, binary: str, model: str, body: dict, args: argparse.Namespace) -> int:
    """One phase that starts its own llama-servers, alone: quicker while working on it."""
    print(f"{phase} alone", flush=True)
    if phase == "cache":
        results[phase] = cache.run(binary, model, body)
    elif phase == "persist":
        results[phase] = persist.run(binary, model, body, args.persist_rounds)
    else:
        results[phase] = upstreams.run(binary, model, body)
    results["checks"] = checks(results, only=phase)
    print("\n" + phase_table(results, phase))
    (RESULTS / f"{phase}.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {RESULTS / (phase + '.json')}")
    return verdict(results["checks"])


def verdict(found: list) -> int:
    """Say which targets were missed or within the run's noise; 1 if any was missed."""
    missed = [name for name, _, _, _, ok, _ in found if not ok]
    noisy = [name for name, _, _, target, _, span in found if undecided(target, span)]
    if noisy:
        print("within this run's noise (more rounds would tell): " + ", ".join(noisy))
    if missed:
        print("TARGETS MISSED: " + ", ".join(missed))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
