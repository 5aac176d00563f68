"""The results table `make bench` prints and writes to bench/results/latest.md (the README's
benchmark table is copied from it)."""

from __future__ import annotations

from bench.load import START_BURST_SECONDS
from bench.targets import undecided


def memory(name: str, values: dict, parts: dict | None = None) -> str:
    """"123 MB (arbiter 28 + worker 95)" from an idle or peak reading."""
    split = (parts or {}).get(name) or values.get(f"{name}_parts") or []
    text = f"{values[name]:.0f} MB"
    if len(split) == 2:
        text += f" (arbiter {split[0]:.0f} + worker {split[1]:.0f})"
    return text


def table(results: dict) -> str:
    """Markdown: the overhead table, the load, memory, prompt-cache (in memory and across restarts)
    and collector figures, and every target with its value, its 95% interval where it has one,
    and its verdict."""
    o, c, k, col = results["overhead"], results["concurrency"], results["cache"], results["collector"]
    m = results["machine"]

    def added_ttft(name: str) -> str:
        span = o.get(f"{name}_stream_added_ttft_interval_ms")
        text = f"{o[f'{name}_stream_added_ttft_ms']:+.1f}"
        return text if span is None else f"{text}; {span[0]:+.1f} to {span[1]:+.1f}"

    lines = [
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; model: {results['model']}; "
        f"llama-server 1 slot, -t 1; {results['date']}"),
        "",
        "| measure | direct | OpenAI relay | Anthropic translation |",
        "|---|---|---|---|",
        (f"| 1-token completion p50 / p90 / p99 (ms) | {o['latency_ms']['direct']['p50']:.2f} / {o['latency_ms']['direct']['p90']:.2f} / {o['latency_ms']['direct']['p99']:.2f} "
        f"| {o['latency_ms']['relay']['p50']:.2f} / {o['latency_ms']['relay']['p90']:.2f} / {o['latency_ms']['relay']['p99']:.2f} "
        f"| {o['latency_ms']['anthropic']['p50']:.2f} / {o['latency_ms']['anthropic']['p90']:.2f} / {o['latency_ms']['anthropic']['p99']:.2f} |"),
        (f"| added latency p50 / p90 / p99 (ms) | | {o['relay_added_ms']['p50']:+.2f} / {o['relay_added_ms']['p90']:+.2f} / {o['relay_added_ms']['p99']:+.2f} "
        f"| {o['anthropic_added_ms']['p50']:+.2f} / {o['anthropic_added_ms']['p90']:+.2f} / {o['anthropic_added_ms']['p99']:+.2f} |"),
        (f"| added by a bare WSGI relay under the same gunicorn (bench/floor.py) | | {o['floor_added_ms']['p50']:+.2f} / "
        f"{o['floor_added_ms']['p90']:+.2f} / {o['floor_added_ms']['p99']:+.2f} | |"),
        (f"| added by the same relay as a one-route Flask app (bench/floor.py) | | {o['flask_added_ms']['p50']:+.2f} / "
        f"{o['flask_added_ms']['p90']:+.2f} / {o['flask_added_ms']['p99']:+.2f} | |"),
        (f"| streamed {o['stream']['direct']['tokens']:.0f} tokens: time to first token, median (added, paired by round; its 95% interval) (ms) "
        f"| {o['stream']['direct']['ttft_ms']:.1f} | {o['stream']['relay']['ttft_ms']:.1f} ({added_ttft('relay')}) "
        f"| {o['stream']['anthropic']['ttft_ms']:.1f} ({added_ttft('anthropic')}) |"),
        (f"| streamed: tokens/s at the client, median (throughput ratio to direct, paired by round) | {o['stream']['direct']['tokens_per_s']:.0f} "
        f"| {o['stream']['relay']['tokens_per_s']:.0f} ({o['relay_stream_throughput_ratio']:.3f}) "
        f"| {o['stream']['anthropic']['tokens_per_s']:.0f} ({o['anthropic_stream_throughput_ratio']:.3f}) |"),
        (f"| of which: share of llama-server's rate that reached the client (ratio to direct) | "
        f"| {o['relay_stream_delivered_ratio']:.3f} | {o['anthropic_stream_delivered_ratio']:.3f} |"),
        (f"| and: llama-server's own rate for the same streams, median tokens/s (ratio to direct) "
        f"| {o['stream']['direct']['server_tokens_per_s']:.0f} "
        f"| {o['stream']['relay']['server_tokens_per_s']:.0f} ({o['relay_stream_server_rate_ratio']:.3f}) "
        f"| {o['stream']['anthropic']['server_tokens_per_s']:.0f} ({o['anthropic_stream_server_rate_ratio']:.3f}) |"),
        "| llama-server's generating thread per stream: ms waiting for a CPU, mean (share of its generating time) "
        + "".join(f"| {o['stream'][n]['server_cpu_wait_ms']:.2f} ({o['stream'][n]['server_cpu_wait_ms'] / o['stream'][n]['generating_ms']:.2%}) "
                  for n in ("direct", "relay", "anthropic")) + "|",
        "",
        (f"Of the relay's added p50, {o['floor_added_ms']['p50']:.2f} ms is what a bare WSGI relay under the same gunicorn settings adds "
        f"(the server model by itself, on this machine) and {o['relay_added_ms']['p50'] - o['floor_added_ms']['p50']:.2f} ms is "
        "llamabridge's own work (admission gate, request parsing, metrics, request log, disconnect watch). Flask's request handling, "
        "which the completion and message routes skip (proxy/fastpath.py), would add "
        f"{o['flask_added_ms']['p50'] - o['floor_added_ms']['p50']:.2f} ms more (the one-route Flask relay against the bare one)."),
        "",
        (f"How much the CPU's caches go cold between requests on this machine: Flask's handling of one request takes "
        f"{m['idle']['flask_request_hot_us']:.0f} µs back to back and {m['idle']['flask_request_after_idle_us']:.0f} µs after "
        f"{m['idle']['idle_ms']:.0f} ms idle ({m['idle']['flask_request_after_idle_us'] / m['idle']['flask_request_hot_us']:.1f}x). "
        "Every proxied request runs after such a pause, so part of the added milliseconds above is paid in cache "
        "misses, and they move with this factor from run to run."),
        "",
        (f"Under load ({c['clients']} Claude Code-shaped clients, {c['seconds']:.0f} s, {c['requests']} requests: "
        f"{c['by_kind']['main']} main turns, {c['by_kind']['title']} titles, {c['by_kind']['count_tokens']} token counts): "
        f"{c['failed']} failed; llama-server processing at most {c['max_upstream_processing']:.0f}, deferred at most "
        f"{c['max_upstream_deferred']:.0f}."),
        "",
        (f"Memory (resident, gunicorn's arbiter and worker added up): the proxy {memory('proxy', results['rss_idle_mb'])} idle "
        f"(after start-up and one request per route), {memory('proxy', results['rss_mb'], results.get('rss_peak_parts_mb'))} "
        f"at the load's peak; the collector {results['rss_idle_mb']['collector']:.0f} MB idle, "
        f"{results['rss_mb']['collector']:.0f} MB at the peak."),
        "",
        "| class | requests | queue wait p50 / p90 / p99 (ms) |",
        "|---|---|---|",
    ]
    for klass, q in c["queue_wait_ms"].items():
        lines.append(f"| {klass} | {q['n']} | {q['p50']:.1f} / {q['p90']:.1f} / {q['p99']:.1f} |")
    lines += [
        "",
        (f"Background requests answered without the model (session titles, token-count probes): p50 {c['background_local_ms']['p50']:.1f} ms, "
        f"p99 {c['background_local_ms']['p99']:.1f} ms in the proxy (client-side, titles: p99 {c['title_client_ms']['p99']:.1f} ms); "
        f"after the first {START_BURST_SECONDS:.0f} s, when all sessions start at once: p99 {c['background_after_start_ms']['p99']:.1f} ms "
        f"of {c['background_after_start_ms']['n']}. "
        f"Token counts (count_tokens, exact, then cached): p50 {c['count_tokens_ms']['p50']:.1f} ms, p99 {c['count_tokens_ms']['p99']:.1f} ms, "
        f"slowest {c['count_tokens_ms']['max']:.0f} ms in the proxy."),
        "",
        *cache_lines(k),
        "",
        *persist_lines(results["persist"]),
        "",
        *upstreams_lines(results["upstreams"]),
        "",
        f"Collector: a scrape takes {col['scrape_wall_ms_p50']:.1f} ms p50 ({col['scrape_wall_ms_p99']:.1f} ms p99) and "
        f"{col['scrape_cpu_ms_mean']:.1f} ms of CPU; SQLite grows {col['sqlite_bytes_per_day'] / 1e6:.2f} MB per day of 10 s scrapes "
        f"({col['sqlite_bytes_month'] / 1e6:.1f} MB after 30 days); dashboard API with a month of data, p50 / p99 ms: "
        + ", ".join(f"`{path}` {v['p50']:.1f} / {v['p99']:.1f}" for path, v in col["api_ms"].items()) + ".",
        "",
        *target_lines(results["checks"]),
    ]
    return "\n".join(lines)


def phase_table(results: dict, phase: str) -> str:
    """Markdown for one phase run alone (`bench/run.py --only`): its figures and its targets."""
    lines = {"cache": cache_lines, "persist": persist_lines, "upstreams": upstreams_lines}[phase](results[phase])
    servers = "llama-servers as below" if phase == "upstreams" else "llama-server 1 slot, -t 1"
    return "\n".join([f"Model: {results['model']}; {servers}; {results['date']}", "", *lines, "",
                      *target_lines(results["checks"])])


def cache_lines(k: dict) -> list[str]:
    return [
        "| prompt tokens evaluated | " + " | ".join(k["turns"]) + " | total |",
        "|---|" + "---|" * (len(k["turns"]) + 1),
        "| direct (llama-server /v1/messages) | " + " | ".join(f"{v:.0f}" for v in k["direct"]) + f" | {k['direct_total']:.0f} |",
        "| through llamabridge | " + " | ".join(f"{v:.0f}" for v in k["proxy"]) + f" | {k['proxy_total']:.0f} |",
        "",
        f"Second session's first turn: {k['second_session_saving']:.1%} fewer prompt tokens through the proxy.",
    ]


def persist_lines(p: dict) -> list[str]:
    """The turns after a llama-server restart, and what saving slots costs."""
    largest = max(p["saves"], key=lambda s: s["tokens"])
    overlapped = p["rounds_overlapped"]
    waited = (f"the longest waited {p['max_wait_ms']:.1f} ms; the longest save of those rounds took {p['max_save_ms']:.1f} ms"
              if overlapped else f"no wait to measure (the longest save of those rounds took {p['max_save_ms']:.1f} ms)")
    restoring = ("" if p["restore_ms_per_1k_tokens"] is None else
                 f"; restoring one {p['restore_ms_per_1k_tokens']:.2f} ms per 1,000 tokens (median of {len(p['restores'])})")
    in_slot = ""
    if p.get("in_slot_ttft_ms") is not None:
        in_slot = (f" With the session's cache still in the slot, a turn's first token comes after {p['direct_in_slot_ttft_ms']:.0f} ms "
                   f"direct and {p['in_slot_ttft_ms']:.0f} ms through llamabridge (median of the rounds below that waited for no save).")
    return [
        "| after a llama-server restart | " + " | ".join(p["turns"]) + " |",
        "|---|" + "---|" * len(p["turns"]),
        "| prompt tokens evaluated, direct | " + " | ".join(f"{v:.0f}" for v in p["direct"]) + " |",
        "| prompt tokens evaluated, through llamabridge (tokens restored from disk) | "
        + " | ".join(f"{v:.0f} ({r})" for v, r in zip(p["proxy"], p["restored"], strict=True)) + " |",
        "| time to first token, direct (ms) | " + " | ".join(f"{v:.0f}" for v in p["direct_ttft_ms"]) + " |",
        "| time to first token, through llamabridge (ms) | " + " | ".join(f"{v:.0f}" for v in p["proxy_ttft_ms"]) + " |",
        "",
        (f"Each turn after a restart of its own: continuing sessions evaluate {p['continuing_saving']:.1%} fewer prompt tokens "
         f"than direct (the lesser of the two), the new session {p['new_session_saving']:.1%} fewer.{in_slot}"),
        "",
        (f"Saving a slot: {p['save_ms_per_1k_tokens']:.2f} ms and {p['save_mb_per_1k_tokens']:.3f} MB per 1,000 tokens "
         f"(median of {len(p['saves'])} saves; the largest, {largest['tokens']} tokens, {largest['mb']:.1f} MB in {largest['ms']:.0f} ms)"
         f"{restoring}. A turn sent as its slot's save was due, {len(p['rounds'])} rounds: {overlapped} arrived while the save ran; "
         f"{waited}."),
    ]


def upstreams_lines(u: dict) -> list[str]:
    """Sessions on one llama-server and on two, and the failures when one of two stops."""
    one, two, fail = u["one"], u["two"], u["failover"]

    def spread(run: dict) -> str:
        return ", ".join(f"{n}" for _, n in sorted(run["upstream_turns"].items(), key=lambda kv: str(kv[0])))

    lines = [
        (f"{u['sessions']} Claude Code-shaped sessions of {u['turns_per_session']} streamed main turns at once, "
         f"each llama-server with {u['slots']} slots (one per session) and `-t 1`:"),
        "",
        "| llama-servers | main turns | seconds | turns per minute | turns per llama-server | cached share of turns 2 and later: least / mean |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("one", one), ("two", two), ("two, one stopped midway", fail)):
        lines.append(f"| {name} | {run['turns']} | {run['seconds']:.1f} | {run['turns_per_minute']:.1f} | {spread(run)} "
                     f"| {run['min_cached_share']:.1%} / {run['mean_cached_share']:.1%} |")
    stopped = fail.get("stopped") or {}
    lines += ["", (f"Two llama-servers complete {u['speedup']:.2f}x the main turns per minute of one. Stopping one "
                   f"after {stopped.get('at_turns', '?')} turns: {len(fail['failures'])} requests failed, "
                   f"{fail['failed_before_answer']} of them before their answer had started; "
                   f"{fail['sessions_finished']} of {u['sessions']} sessions finished every turn.")]
    if fail["failures"]:
        lines += ["", "| session | turn | status | error at the client | answer started | upstream | logged status / error |",
                  "|---|---|---|---|---|---|---|"]
        for f in fail["failures"]:
            lines.append(f"| {f['session']} | {f['turn']} | {f['status']} | {f['error']} | {'yes' if f['answering'] else 'no'} "
                         f"| {f['upstream']} | {f['logged_status']} / {f['logged_error']} |")
    return lines


def target_lines(checks: list) -> list[str]:
    """Every target with its value, its 95% interval where it has one, and its verdict."""
    lines = ["| target | value | 95% interval | |", "|---|---|---|---|"]
    for name, value, op, target, ok, span in checks:
        shown = "" if span is None else f"{span[0]:.3f} to {span[1]:.3f}"
        if undecided(target, span):
            shown += " (holds the target: this run cannot tell)"
        digits = 3
        while f"{value:.{digits}f}" == f"{target:.{digits}f}" and value != target and digits < 6:
            digits += 1  # 0.97996 is not 0.980: show it so, next to MISSED
        lines.append(f"| {name} {op} {target} | {value:.{digits}f} | {shown} | {'met' if ok else '**MISSED**'} |")
    return lines
