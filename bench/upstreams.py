"""Several llama-servers behind one port: what a second one gives Claude Code sessions, and what
happens to them when one of the two goes away.

Three runs, each on llama-servers of its own (the same model, one slot and `-t 1` each), with the
proxy in front (LLAMA_URL=url1 or url1,url2) and the product's defaults otherwise:

Each llama-server has a slot per session, so that where a session's cache is depends on the
proxy alone. With fewer slots than sessions, llama-server keeps a slot's prompt in its host-memory
cache only when the next request would keep less than half of it (server-context.cpp, the
`f_keep < 0.5` test); these sessions share most of their prompt, so the next session overwrites
the previous one's own part, and the share would measure llama-server's slot count rather than
the proxy.

1. `one`, then `two`: SESSIONS Claude Code-shaped sessions of TURNS streamed main turns each, all
   sessions at once (a thread each), each session's turns one after the other. Per session turns
   2 and 3: the share of the prompt llama-server took from its cache (the answer's
   cache_read_input_tokens over input_tokens plus those); per run: main turns completed per
   minute, from the first request sent to the last answer.
2. `failover`: the same on two llama-servers, one of which is stopped (SIGTERM) once a third of
   the turns are done, while it runs one. A session whose turn fails sends it again, after the
   answer's Retry-After if it has one, as Claude Code (the Anthropic SDK) does. Reported: every failed request (the client's status and error, and whether
   its answer had started, with the proxy's request-log row of it: upstream, status, error),
   and whether every session finished on the other llama-server.

The prompt is not the recorded 23k-token first turn as such. Sessions of the recorded one differ
only in their last few tokens, so any slot holding any session's prompt would serve a turn
almost whole from cache, and the share taken from cache would not tell whether a session found
its own cache; its cold prefill (one per llama-server, which no second server shortens) would
also take most of each run. So each session here has the recorded system prompt, its first user
message, its Agent tool and its four smallest others (the shared part, as every session of a Claude Code version
sends it), its own billing header, and a pasted file of its own that makes it a tenth or so of
the prompt: a turn that lands where its cache is not loses more than 5%.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.persist import request_rows
from tests.support import processes
from tests.support.waiting import wait_until

SESSIONS = 8
TURNS = 3
# A short answer per turn, as a main turn's tool call is: the run measures turns, not tokens.
MAX_TOKENS = 32
REPLIES = ["I read the file.", "Done: the change is in."]
SHARED_TOOLS = 5
# A slot per session on every llama-server: see the module docstring.
SLOTS = SESSIONS
CTX_PER_SLOT = 16384
RETRIES = 3
# The share of turns done when the failover run stops one llama-server.
STOP_AFTER = 1 / 3


def first_turn(body: dict, index: int) -> dict:
    """Session `index`'s first main turn, from the recorded one (`body`): see the module docstring."""
    own = random.Random(index)
    pasted = " ".join(f"{own.choice(['def', 'class', 'return', 'if', 'for', 'while', 'yield'])}_{own.randrange(10000)}"
                      for _ in range(250))
    turn = copy.deepcopy(body)
    turn["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.328.{index:03x}; cc_entrypoint=cli;"
    # The Agent tool makes it a main turn (proxy/classify.py); the smallest others keep it short.
    others = sorted((t for t in turn["tools"] if t["name"] != "Agent"), key=lambda t: len(str(t)))[:SHARED_TOOLS - 1]
    turn["tools"] = [t for t in turn["tools"] if t["name"] == "Agent"] + others
    turn["messages"][0]["content"][-1]["text"] = f"Review this file, session {index}:\n\n{pasted}"
    turn.update(max_tokens=MAX_TOKENS, stream=True)
    return turn


def session_turns(body: dict, index: int) -> list[dict]:
    """Its TURNS turns: each the one before, the assistant's reply and a new user line."""
    turns = [first_turn(body, index)]
    for i, reply in enumerate(REPLIES[:TURNS - 1]):
        nxt = copy.deepcopy(turns[-1])
        nxt["messages"] += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Now step {i + 2}, please."}]
        turns.append(nxt)
    return turns


def send(proxy_url: str, body: dict, session: str) -> dict:
    """One streamed turn: status, error (None when it finished), whether its answer had started
    (a content delta came), its usage, and when it was sent and ended (monotonic)."""
    out: dict = {"session": session, "status": None, "error": None, "answering": False, "usage": None, "retry_after": 0.0,
                 "sent": time.monotonic()}
    try:
        with requests.post(proxy_url + "/v1/messages?beta=true", json=body, stream=True, timeout=600,
                           headers={"X-Claude-Code-Session-Id": session}) as resp:
            out["status"] = resp.status_code
            out["retry_after"] = float(resp.headers.get("Retry-After") or 0)
            if resp.status_code != 200:
                out["error"] = resp.text[:300]
                return out
            event, stopped = None, False
            for line in resp.iter_lines():
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                    out["answering"] = out["answering"] or event == "content_block_delta"
                    stopped = stopped or event == "message_stop"
                elif line.startswith(b"data: ") and event in ("message_delta", "error"):
                    data = json.loads(line[6:])
                    if event == "message_delta":
                        out["usage"] = data.get("usage")
                    else:
                        out["error"] = f"event: error {data.get('error', {}).get('message', data)}"
            if out["error"] is None and not stopped:
                out["error"] = "the stream ended without message_stop"
    except requests.RequestException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["ended"] = time.monotonic()
    return out


def cached_share(usage: dict | None) -> float | None:
    if not usage:
        return None
    cached = usage.get("cache_read_input_tokens") or 0
    total = (usage.get("input_tokens") or 0) + cached
    return cached / total if total else None


def run_sessions(proxy_url: str, body: dict, prefix: str, on_turn: Callable[[], None] | None = None) -> list[list[dict]]:
    """Every session at once, its turns in order; a failed turn is sent again up to RETRIES
    times. Returns each session's attempts, in order; `on_turn()` hears of each completed turn."""
    def session(index: int) -> list[dict]:
        attempts = []
        for number, turn in enumerate(session_turns(body, index), start=1):
            for _ in range(1 + RETRIES):
                result = dict(send(proxy_url, turn, f"{prefix}-{index}"), turn=number)
                attempts.append(result)
                if result["error"] is None:
                    if on_turn:
                        on_turn()
                    break
                time.sleep(min(result["retry_after"], 10.0))  # the client's back-off, as the answer asks
        return attempts

    with ThreadPoolExecutor(SESSIONS) as pool:
        return list(pool.map(session, range(SESSIONS)))


def summary(proxy_url: str, sessions: list[list[dict]], prefix: str) -> dict:
    """Per run: turns done, the rate, the cached share of turns 2 and up, and the failures with
    the proxy's own row of each (its upstream, status and error)."""
    attempts = [a for s in sessions for a in s]
    rows = {}
    for index, made in enumerate(sessions):
        for attempt, row in zip(made, request_rows(proxy_url, f"{prefix}-{index}", len(made)), strict=False):
            rows[id(attempt)] = row
    done = [a for a in attempts if a["error"] is None]
    start, end = min(a["sent"] for a in attempts), max(a["ended"] for a in attempts)
    later = [cached_share(a["usage"]) for a in done if a["turn"] >= 2]
    known = [s for s in later if s is not None]
    return {
        "turns": len(done), "seconds": end - start, "turns_per_minute": len(done) / (end - start) * 60,
        "cached_share_later_turns": known, "min_cached_share": min(known) if known else 0.0,
        "mean_cached_share": sum(known) / len(known) if known else 0.0,
        "sessions_finished": sum(1 for s in sessions if sum(a["error"] is None for a in s) == TURNS),
        "upstream_turns": _count(rows[id(a)]["upstream"] for a in done if id(a) in rows),
        "failures": [{"session": a["session"], "turn": a["turn"], "status": a["status"], "error": a["error"],
                      "answering": a["answering"], "upstream": rows.get(id(a), {}).get("upstream"),
                      "logged_status": rows.get(id(a), {}).get("status"), "logged_error": rows.get(id(a), {}).get("error")}
                     for a in attempts if a["error"] is not None],
    }


def _count(values: Iterable) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def busy(llama_url: str) -> bool:
    """Whether llama-server is working on a request now (its /slots)."""
    try:
        return any(s.get("is_processing") for s in requests.get(llama_url + "/slots", timeout=5).json())
    except (requests.RequestException, ValueError):
        return False


def one_run(binary: str, model: str, body: dict, servers: int, prefix: str, stop_one: bool = False) -> dict:
    """A run of every session on `servers` fresh llama-servers behind one proxy; with `stop_one`,
    the first llama-server is stopped once STOP_AFTER of the turns are done, while it runs one."""
    llamas = [processes.llama_server(binary, model, ctx=SLOTS * CTX_PER_SLOT, parallel=SLOTS).start() for _ in range(servers)]
    proxy = None
    try:
        proxy = processes.proxy(",".join(s.url for s in llamas)).start()
        done = [0]
        lock = threading.Lock()
        reached, over = threading.Event(), threading.Event()

        def on_turn() -> None:
            with lock:
                done[0] += 1
                if done[0] >= SESSIONS * TURNS * STOP_AFTER:
                    reached.set()

        stopper = None
        stopped: dict = {}
        if stop_one:
            def stop() -> None:
                reached.wait()
                wait_until(lambda: over.is_set() or busy(llamas[0].url), timeout=120, what="a request on the llama-server to stop")
                if not over.is_set():
                    stopped.update(url=llamas[0].url, at_turns=done[0])
                    llamas[0].stop()
            stopper = threading.Thread(target=stop, daemon=True)
            stopper.start()
        sessions = run_sessions(proxy.url, body, prefix, on_turn if stop_one else None)
        over.set()
        reached.set()
        if stopper:
            stopper.join(timeout=120)
        result = summary(proxy.url, sessions, prefix)
        if stop_one:
            result["stopped"] = stopped
            result["failed_before_answer"] = sum(1 for f in result["failures"] if not f["answering"])
        result["proxy_log"] = str(proxy.log_path)
        return result
    finally:
        if proxy:
            proxy.stop()
        for llama in llamas:
            llama.stop()


def run(binary: str, model: str, body: dict) -> dict:
    """The three runs of the module docstring; `body` is the recorded session's first main turn."""
    result: dict = {"sessions": SESSIONS, "turns_per_session": TURNS, "max_tokens": MAX_TOKENS, "slots": SLOTS}
    for name, servers in (("one", 1), ("two", 2)):
        print(f"upstreams: {SESSIONS} sessions on {servers} llama-server(s)", flush=True)
        result[name] = one_run(binary, model, body, servers, f"upstreams-{name}")
    print("upstreams: two llama-servers, one stopped midway", flush=True)
    result["failover"] = one_run(binary, model, body, 2, "upstreams-failover", stop_one=True)
    result["speedup"] = result["two"]["turns_per_minute"] / result["one"]["turns_per_minute"]
    return result
