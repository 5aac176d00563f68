"""The prompt-cache benchmark: prompt tokens llama-server evaluates per turn of two Claude Code
sessions, replayed straight to its native /v1/messages and through the proxy.

Each mode gets a fresh llama-server, so neither inherits the other's cache. The second session
is the same project in a new Claude Code session, whose first request differs from the first
session's in its first bytes (Claude Code's billing header) and its last message: what the proxy
saves there is what a user saves at every new session.
"""

from __future__ import annotations

import copy

import requests

from bench.readings import llama_metrics
from tests.support import processes

REPLIES = ["I read the files.", "Done: the tests pass."]


def conversation(body: dict, replies: list[str]) -> list[dict]:
    """A session's turns: the recorded first turn, then the assistant's reply and a new user line each."""
    turns = [dict(copy.deepcopy(body), max_tokens=8, stream=False)]
    for i, reply in enumerate(replies):
        nxt = copy.deepcopy(turns[-1])
        nxt["messages"] += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Now step {i + 2}, please."}]
        turns.append(nxt)
    return turns


def other_session(body: dict) -> dict:
    """The same project in a new Claude Code session: a new billing hash, another first request."""
    other = copy.deepcopy(body)
    other["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.328.9e1; cc_entrypoint=cli;"
    other["messages"][0]["content"][-1]["text"] = "explain what this repository does"
    return other


def prompt_tokens(llama_url: str) -> float:
    """llama-server's count of prompt tokens evaluated since it started."""
    return llama_metrics(llama_url)[0]["prompt_tokens_total"]


def run(binary: str, model: str, body: dict) -> dict:
    """Both sessions, direct and then through the proxy, each on a llama-server of its own started
    from `binary` and `model`; `body` is the recorded session's first main turn."""
    sessions = {"one": conversation(body, REPLIES), "two": conversation(other_session(body), REPLIES)}
    result: dict[str, list[float]] = {}
    for mode in ("direct", "proxy"):
        with processes.llama_server(binary, model, ctx=32768) as llama:
            proxy = processes.proxy(llama.url).start() if mode == "proxy" else None
            try:
                per_turn = []
                for name, turns in sessions.items():
                    for body_ in turns:
                        before = prompt_tokens(llama.url)
                        if proxy:
                            resp = requests.post(proxy.url + "/v1/messages?beta=true", json=body_, timeout=600,
                                                 headers={"X-Claude-Code-Session-Id": f"cache-{name}"})
                        else:
                            resp = requests.post(llama.url + "/v1/messages", json=body_, timeout=600)
                        assert resp.status_code == 200, resp.text[:300]
                        per_turn.append(prompt_tokens(llama.url) - before)
                result[mode] = per_turn
            finally:
                if proxy:
                    proxy.stop()
    first_two = len(sessions["one"])  # index of the second session's first turn
    direct, proxied = result["direct"], result["proxy"]
    return {"turns": [f"session {s} turn {t + 1}" for s in ("1", "2") for t in range(len(sessions["one"]))],
            "direct": direct, "proxy": proxied, "direct_total": sum(direct), "proxy_total": sum(proxied),
            "second_session_saving": 1 - proxied[first_two] / direct[first_two] if direct[first_two] else 0.0,
            "turns_worse_than_direct": sum(1 for d, p in zip(direct, proxied) if p > d)}
