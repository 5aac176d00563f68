"""The prompt cache across llama-server restarts: what the proxy's slot saves (proxy/kvcache.py)
give back after a restart, and what they cost.

Direct and through the proxy, each on a llama-server of its own that saves slots to a directory
(`--slot-save-path`) and is restarted on the same port:

1. Turn 1 of two sessions of the recorded conversation (bench/cache.py's session one and two).
   Through the proxy, the bench waits for each session's slot to be saved (KV_SAVE_IDLE after
   the turn) before the next request: with one slot, the next session would take it first.
2. Then, each after a restart of its own: session one's turn 2, session two's turn 2, and the
   first turn of a third session. A restart before every one of them, so that each finds an
   empty slot and only the files on disk can spare its prefill: after a single restart the
   first turn's restore would fill the slot and the next turns would reuse that, which is the
   in-memory cache bench/cache.py already measures. Per turn: prompt tokens llama-server
   evaluated (its own counter) and time to the first token of the streamed answer; for
   comparison, the same of a turn whose cache is still in the slot.
3. What saving costs (through the proxy only): save time and file size per 1,000 tokens, from
   the proxy's log line of each save, and how long a turn waits when it arrives while its slot
   is being saved. A save takes milliseconds, so the third session goes on for several rounds,
   each sending its next turn when the previous turn's save is due, moved earlier or later from
   round to round towards the moment the save starts (the proxy's own work before the gate,
   rendering and counting the prompt, varies): rounds whose turn waited in the gate (one client
   and one slot: only a save can hold it) are the ones that overlapped a save.
"""

from __future__ import annotations

import copy
import re
import statistics
import tempfile
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.cache import conversation, other_session, prompt_tokens
from tests.support import processes
from tests.support.waiting import wait_until

REPLIES = ["I read the files."]
ROUNDS = 20
SAVE_IDLE = 1.0  # KV_SAVE_IDLE for the proxy: short, so the phase does not wait long for each save
# A turn granted at once waits microseconds in the gate; one that waited for a save, at least
# part of a save.
WAITED = 0.001
# The proxy's log lines for a save and a restore (proxy/kvcache.py).
SAVED = re.compile(r"saved slot \d+ of session (?P<session>\S+): (?P<tokens>\d+) tokens, (?P<mb>[\d.]+) MB in (?P<ms>\d+) ms")
RESTORED = re.compile(r"restored (?P<tokens>\d+) tokens of session \S+ prompt cache into slot \d+ from \S+ in (?P<ms>\d+) ms")


def third_session(body: dict) -> dict:
    """Another new Claude Code session in the same project: its own billing hash and first request."""
    third = copy.deepcopy(other_session(body))
    third["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.328.4c7; cc_entrypoint=cli;"
    third["messages"][0]["content"][-1]["text"] = "find where the tests start llama-server"
    return third


def proxy_metrics(proxy_url: str) -> dict[str, float]:
    """The proxy's /metrics samples by name, with the class label of those that have one
    (`llamabridge_proxy_queue_wait_seconds_sum/main`)."""
    text = requests.get(proxy_url + "/metrics", timeout=10).text
    return {s.name + (f"/{s.labels['class']}" if "class" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if set(s.labels) <= {"class"}}


def saves(proxy_url: str) -> tuple[float, float, float, float]:
    """(slots saved, seconds spent saving, main turns recorded, seconds they waited in the gate)
    since the proxy started; a failed save raises."""
    m = proxy_metrics(proxy_url)
    assert not m.get("llamabridge_proxy_kv_save_failures_total"), "the proxy could not save a slot (see its log)"
    return (m.get("llamabridge_proxy_kv_saves_total", 0.0), m.get("llamabridge_proxy_kv_save_seconds_sum", 0.0),
            m.get("llamabridge_proxy_queue_wait_seconds_count/main", 0.0), m.get("llamabridge_proxy_queue_wait_seconds_sum/main", 0.0))


def until_more(proxy_url: str, index: int, than: float, what: str) -> None:
    """Wait until figure `index` of saves() has grown past `than`."""
    wait_until(lambda: saves(proxy_url)[index] > than, timeout=120, what=what)


def stream(url: str, body: dict, headers: dict[str, str]) -> tuple[float, float]:
    """Send a turn streamed: (ms to its first token, monotonic time its stream ended). The first
    content_block_delta, or the message_delta of an answer without text: either comes once the
    prompt is evaluated (the proxy sends message_start and pings before)."""
    started = time.perf_counter()
    first = None
    stopped = False
    with requests.post(url, json=dict(body, stream=True), headers=headers, stream=True, timeout=600) as resp:
        assert resp.status_code == 200, resp.text[:300]
        for line in resp.iter_lines():
            if first is None and line in (b"event: content_block_delta", b"event: message_delta"):
                first = time.perf_counter() - started
            stopped = stopped or line == b"event: message_stop"
    assert first is not None and stopped, f"the stream from {url} ended early"
    return first * 1000, time.monotonic()


def request_rows(proxy_url: str, session: str, count: int) -> list[dict]:
    """The session's rows of the proxy's request log, oldest first, once all `count` are written
    (the log is written off the request thread)."""
    rows: list[dict] = []

    def written() -> bool:
        nonlocal rows
        rows = requests.get(proxy_url + "/api/requests", params={"session": session, "limit": "2000"}, timeout=10).json()["requests"]
        return len(rows) >= count

    wait_until(written, timeout=120, what=f"{count} request log rows of {session}")
    return sorted(rows, key=lambda r: r["ts"])


def waiting_rounds(proxy_url: str, turns: list[dict], headers: dict[str, str], ended: float) -> list[dict]:
    """Send each turn as the previous turn's save is due, earlier or later by an offset that
    looks for the save's start: later when the turn came before the save (the save was skipped),
    earlier when it came after; the step doubles while it keeps going one way and halves when it
    turns. A turn that waited for the save moves the next one a millisecond earlier: the longest
    waits are those that begin with the save. Returns each round's offset, whether the save
    happened and how long it took, the turn's wait in the gate and its time to first token."""
    offset, step, last_move = 0.0, 0.01, 0
    rounds = []
    for body in turns:
        saved_before, seconds_before, turns_before, waited_before = saves(proxy_url)
        send_at = ended + SAVE_IDLE + offset
        time.sleep(max(0.0, send_at - time.monotonic()))  # the moment under test, not a wait for an event
        ttft, ended = stream(proxy_url + "/v1/messages?beta=true", body, headers)
        until_more(proxy_url, 2, turns_before, "the proxy recording the turn")
        saved_after, seconds_after, _, waited_after = saves(proxy_url)
        # This turn's own save is due SAVE_IDLE after it ended: what was read is the previous turn's.
        assert saved_after - saved_before <= 1 and time.monotonic() < ended + SAVE_IDLE, "a round overran its save"
        saved, waited = saved_after > saved_before, waited_after - waited_before
        overlapped = saved and waited >= WAITED
        rounds.append({"offset_ms": offset * 1000, "saved": saved, "save_ms": (seconds_after - seconds_before) * 1000 if saved else None,
                       "wait_ms": waited * 1000, "overlapped": overlapped, "ttft_ms": ttft})
        if overlapped:
            offset, step, last_move = offset - 0.001, 0.001, -1
            continue
        move = 1 if not saved else -1
        if last_move:
            step = step * 2 if move == last_move else max(step / 2, 0.001)
        offset += move * step
        last_move = move
    return rounds


def saving_server(binary: str, model: str, port: int, save_dir: str) -> processes.Service:
    """A llama-server that saves slots to `save_dir` when asked, one slot as the rest of the bench."""
    return processes.llama_server(binary, model, ctx=32768, port=port, extra=["--slot-save-path", save_dir]).start()


def run(binary: str, model: str, body: dict, rounds: int = ROUNDS) -> dict:
    """The scenario in the module docstring, direct then through the proxy; `body` is the recorded
    session's first main turn."""
    sessions = {"one": conversation(body, REPLIES), "two": conversation(other_session(body), REPLIES),
                "three": conversation(third_session(body), REPLIES * rounds)}
    order = [("one", 1), ("two", 1), ("one", 2), ("two", 2), ("three", 1)]  # the last three each after a restart
    result: dict = {"turns": ["session 1 turn 2", "session 2 turn 2", "session 3 turn 1"]}
    for mode in ("direct", "proxy"):
        save_dir = tempfile.mkdtemp(prefix="llamabridge-bench-kv-")
        port = processes.free_port()  # a restarted llama-server comes back at the same address
        llama = saving_server(binary, model, port, save_dir)
        proxy = processes.proxy(llama.url, KV_CACHE_DIR=save_dir, KV_SAVE_IDLE=str(SAVE_IDLE)).start() if mode == "proxy" else None
        try:
            evaluated, ttft = [], []
            ended = 0.0
            for i, (name, turn) in enumerate(order):
                if i >= 2:  # every turn after the first two finds a llama-server just restarted
                    llama.stop()
                    llama = saving_server(binary, model, port, save_dir)
                before = prompt_tokens(llama.url)
                if proxy:
                    saved_before = saves(proxy.url)[0]
                    ms, ended = stream(proxy.url + "/v1/messages?beta=true", sessions[name][turn - 1],
                                       {"X-Claude-Code-Session-Id": f"persist-{name}"})
                    if i < len(order) - 1:  # the last turn's save is the first round's to wait for
                        until_more(proxy.url, 0, saved_before, f"the save of session {name}'s turn {turn}")
                else:
                    ms, ended = stream(llama.url + "/v1/messages", sessions[name][turn - 1], {})
                evaluated.append(prompt_tokens(llama.url) - before)
                ttft.append(ms)
            if not proxy:  # the next turn with its cache in the slot, for the rounds' figure through the proxy
                result["direct_in_slot_ttft_ms"] = stream(llama.url + "/v1/messages", sessions["three"][1], {})[0]
            result[mode] = evaluated[2:]
            result[f"{mode}_ttft_ms"] = ttft[2:]
            result[f"{mode}_first_turns"] = evaluated[:2]
            if proxy:
                headers = {"X-Claude-Code-Session-Id": "persist-three"}
                result["rounds"] = waiting_rounds(proxy.url, sessions["three"][1:], headers, ended)
                result.update(costs(proxy, result["rounds"]))
                result["proxy_log"] = str(proxy.log_path)
        finally:
            if proxy:
                proxy.stop()
            llama.stop()
    direct, proxied = result["direct"], result["proxy"]
    saving = [1 - p / d if d else 0.0 for p, d in zip(proxied, direct, strict=True)]
    result["continuing_saving"] = min(saving[:2])
    result["new_session_saving"] = saving[2]
    return result


def costs(proxy: processes.Service, rounds: list[dict]) -> dict:
    """Save and restore figures from the proxy's log, the restored turns' `kv_restored` from its
    request log, and the rounds' waits against their saves."""
    log = proxy.log_text()
    rows = {name: request_rows(proxy.url, f"persist-{name}", n) for name, n in (("one", 2), ("two", 2), ("three", 1))}
    restored = [rows["one"][1]["kv_restored"], rows["two"][1]["kv_restored"], rows["three"][0]["kv_restored"]]
    saved = [{"tokens": int(m["tokens"]), "mb": float(m["mb"]), "ms": float(m["ms"])} for m in SAVED.finditer(log)]
    restores = [{"tokens": int(m["tokens"]), "ms": float(m["ms"])} for m in RESTORED.finditer(log)]
    overlapped = [r for r in rounds if r["overlapped"]]
    max_wait = max((r["wait_ms"] for r in overlapped), default=0.0)
    max_save = max((r["save_ms"] for r in rounds if r["save_ms"] is not None), default=0.0)
    in_slot = [r["ttft_ms"] for r in rounds if not r["overlapped"]]
    return {
        "restored": [t or 0 for t in restored],
        "saves": saved, "restores": restores,
        "save_ms_per_1k_tokens": statistics.median(s["ms"] / s["tokens"] * 1000 for s in saved),
        "save_mb_per_1k_tokens": statistics.median(s["mb"] / s["tokens"] * 1000 for s in saved),
        "restore_ms_per_1k_tokens": statistics.median(r["ms"] / r["tokens"] * 1000 for r in restores) if restores else None,
        # The same session's turns with its cache in the slot, beside the restored turns' ttft.
        "in_slot_ttft_ms": statistics.median(in_slot) if in_slot else None,
        "rounds_overlapped": len(overlapped), "max_wait_ms": max_wait, "max_save_ms": max_save,
        # No round that overlapped a save: nothing measured, which the target reports as missed.
        "wait_over_save": max_wait / max_save if overlapped and max_save else float("inf"),
    }
