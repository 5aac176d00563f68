"""Slot KV caches saved to disk and restored after llama-server restarts (proxy/kvcache.py), with
the real llama-server (`--slot-save-path`) on the tiny model, restarted for real (SIGTERM, then
started again on the same port with the same flags).

Evidence is what llama-server itself says: its count of prompt tokens evaluated
(`llamacpp:prompt_tokens_total`) and each answer's cached tokens, beside the proxy's request log
(`kv_restored`) and metrics.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import pytest
import requests

from tests.support import processes
from tests.support.prom import metric
from tests.support.waiting import wait_until
from tests.test_context_and_cache import common, tokens_of
from tests.test_traffic import AGENT_TOOLS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

# A system prompt of a few thousand tokens, the same for every session (as Claude Code's is for
# one version): what a new session can take from another session's file.
_words = random.Random(7)
SYSTEM = " ".join(_words.choice(["alpha", "beta", "gamma", "delta", "tool", "file", "read", "write", "test", "build", "shell",
                                 "python", "module", "session", "cache", "prompt"]) + str(_words.randrange(100))
                  for _ in range(1500))


def first_turn(session_words: str) -> dict:
    """A session's first main-loop turn: the shared system prompt, then a thousand tokens of its
    own (as a file the user pasted), more than what sessions share decides nothing."""
    own = random.Random(session_words)
    pasted = " ".join(f"{own.choice(['def', 'class', 'return', 'if', 'for'])}{own.randrange(1000)}" for _ in range(600))
    return {"model": "claude-sonnet-4-5", "max_tokens": 8, "stream": False, "tools": AGENT_TOOLS,
            "system": [{"type": "text", "text": SYSTEM}],
            "messages": [{"role": "user", "content": f"Work on this: {session_words}\n\n{pasted}"}]}


def next_turn(body: dict, reply: str, words: str) -> dict:
    body = copy.deepcopy(body)
    body["messages"] += [{"role": "assistant", "content": reply}, {"role": "user", "content": words}]
    return body


def turn(proxy, body: dict, session: str) -> dict:
    resp = requests.post(proxy.url + "/v1/messages?beta=true", json=body, timeout=300,
                         headers={"X-Claude-Code-Session-Id": session})
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()


def evaluated(llama) -> float:
    """Prompt tokens llama-server has evaluated since it started (not taken from a cache)."""
    return metric(llama.url, "llamacpp:prompt_tokens_total")


def saves(proxy) -> float:
    return metric(proxy.url, "llamabridge_proxy_kv_saves_total", missing=0.0)


def restores(proxy, result: str) -> float:
    return metric(proxy.url, "llamabridge_proxy_kv_restores_total", {"result": result}, missing=0.0)


def rows(proxy, session: str, count: int) -> list[dict]:
    """The session's request-log rows, oldest first, once `count` are written."""
    def written():
        found = requests.get(proxy.url + "/api/requests", params={"session": session}, timeout=10).json()["requests"]
        return found if len(found) >= count else None
    return list(reversed(wait_until(written, what=f"{count} request-log rows of session {session}")))


class Stack:
    """A llama-server that saves slots into `kv_dir` and can be restarted on its port, and a proxy
    in front of it that knows the directory."""

    def __init__(self, binary: str, model: str, kv_dir: Path, db: Path, **proxy_env: str):
        self.binary, self.model, self.kv_dir, self.db = binary, model, kv_dir, db
        self.port = processes.free_port()
        self.proxy_env = {"KV_CACHE_DIR": str(kv_dir), "KV_SAVE_IDLE": "0.2", "DB_PATH": str(db), **proxy_env}
        self.llama = self._llama().start()
        self.proxy = processes.proxy(self.llama.url, **self.proxy_env).start()

    def _llama(self, model: str | None = None) -> processes.Service:
        return processes.llama_server(self.binary, model or self.model, ctx=32768, port=self.port,
                                      extra=["--slot-save-path", str(self.kv_dir)])

    def restart_llama(self, model: str | None = None) -> None:
        self.llama.stop()
        self.llama = self._llama(model).start()

    def restart_proxy(self) -> None:
        self.proxy.stop()
        self.proxy = processes.proxy(self.llama.url, **self.proxy_env).start()

    def files(self) -> list[str]:
        return sorted(p.name for p in self.kv_dir.iterdir())

    def stop(self) -> None:
        self.proxy.stop()
        self.llama.stop()


@pytest.fixture
def stack(llama_server_bin, tiny_model, tmp_path):
    (tmp_path / "kv").mkdir()
    made = Stack(llama_server_bin, tiny_model, tmp_path / "kv", tmp_path / "store.db")
    yield made
    made.stop()


def test_sessions_and_a_new_one_start_from_disk_after_llama_server_restarts(stack):
    a1, b1 = first_turn("the parser"), first_turn("the scheduler")
    # Each session goes idle before the next one takes the only slot: a slot is saved only while
    # nobody waits for it.
    turn(stack.proxy, a1, "A")
    wait_until(lambda: saves(stack.proxy) >= 1, what="session A saved")
    turn(stack.proxy, b1, "B")
    wait_until(lambda: saves(stack.proxy) >= 2, what="session B saved")
    assert len(stack.files()) == 2
    health = requests.get(stack.proxy.url + "/healthz", timeout=10).json()
    assert health["kv_cache"].startswith(f"persisted in {stack.kv_dir}: 2 files")

    stack.restart_llama()
    assert evaluated(stack.llama) == 0
    # One slot: the new session finds it empty and takes the shared system prompt from a file;
    # then each continuing session gets its own file back (what the slot held is saved first).
    c1 = first_turn("the release notes")
    a2 = next_turn(a1, "I read the parser.", "Now fix the bug in it.")
    b2 = next_turn(b1, "I read the scheduler.", "Now add a test for it.")
    shared = common(tokens_of(stack.llama, a1), tokens_of(stack.llama, c1))  # the system prompt and tools
    answers = {}
    for name, body in (("C", c1), ("A", a2), ("B", b2)):
        before = evaluated(stack.llama)
        answers[name] = turn(stack.proxy, body, name)["usage"]
        prefilled = evaluated(stack.llama) - before
        total = answers[name]["input_tokens"] + answers[name]["cache_read_input_tokens"]
        if name == "C":  # only its own first message
            assert shared > 4000 and prefilled <= total - shared + 16, (prefilled, total, shared)
        else:
            assert total > 6000 and prefilled < 0.05 * total, (name, prefilled, total, stack.proxy.log_text()[-3000:])
    assert restores(stack.proxy, "restored") == 3
    assert restores(stack.proxy, "failed") == 0 and restores(stack.proxy, "refused") == 0
    for name in "CAB":
        last = rows(stack.proxy, name, 1 if name == "C" else 2)[-1]
        assert last["kv_restored"] > 2000 and last["cached_tokens"] == answers[name]["cache_read_input_tokens"]
    first = rows(stack.proxy, "A", 2)[0]
    assert first["kv_restored"] is None  # a turn that started from nothing says so


def test_the_whole_stack_restarted_finds_its_files_in_the_store(stack):
    a1 = first_turn("the parser")
    turn(stack.proxy, a1, "A")
    wait_until(lambda: saves(stack.proxy) >= 1, what="the session saved")
    stack.proxy.stop()  # as `make up` after editing .env: everything restarts
    stack.restart_llama()
    stack.restart_proxy()
    usage = turn(stack.proxy, next_turn(a1, "Read it.", "Go on."), "A")["usage"]
    assert usage["cache_read_input_tokens"] > 0.9 * (usage["input_tokens"] + usage["cache_read_input_tokens"])
    assert restores(stack.proxy, "restored") == 1


def test_a_file_from_another_model_is_not_restored_and_the_turn_succeeds(stack, other_model):
    a1 = first_turn("the parser")
    turn(stack.proxy, a1, "A")
    wait_until(lambda: saves(stack.proxy) >= 1, what="the session saved")
    stack.restart_llama(other_model)
    before = evaluated(stack.llama)
    usage = turn(stack.proxy, next_turn(a1, "Read it.", "Go on."), "A")["usage"]
    assert usage["cache_read_input_tokens"] == 0
    assert evaluated(stack.llama) - before == usage["input_tokens"] > 2000
    assert restores(stack.proxy, "refused") == 1 and restores(stack.proxy, "restored") == 0
    assert "for another model" in stack.proxy.log_text()


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_deleted_or_corrupted_file_falls_back_to_prefill(stack, damage):
    a1 = first_turn("the parser")
    turn(stack.proxy, a1, "A")
    wait_until(lambda: saves(stack.proxy) >= 1, what="the session saved")
    (saved,) = stack.files()
    stack.restart_llama()
    path = stack.kv_dir / saved
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(os.urandom(path.stat().st_size))
    before = evaluated(stack.llama)
    usage = turn(stack.proxy, next_turn(a1, "Read it.", "Go on."), "A")["usage"]
    assert usage["cache_read_input_tokens"] == 0 and evaluated(stack.llama) - before == usage["input_tokens"] > 2000
    assert restores(stack.proxy, "failed") == 1 and restores(stack.proxy, "restored") == 0
    # The file is no longer offered: gone from disk and from the index.
    wait_until(lambda: saved not in stack.files() and "0 files" in requests.get(stack.proxy.url + "/healthz", timeout=10).json()["kv_cache"]
               or None, what="the damaged file forgotten")
    assert metric(stack.proxy.url, "llamabridge_proxy_kv_evictions_total", {"reason": "missing"}) == 1


def test_the_disk_budget_evicts_the_least_recently_used_file(llama_server_bin, tiny_model, tmp_path):
    (tmp_path / "kv").mkdir()
    # Room for one file of this prompt (about 0.5 kB per token for the tiny model), not two.
    made = Stack(llama_server_bin, tiny_model, tmp_path / "kv", tmp_path / "store.db", KV_CACHE_MAX_GB="0.006")
    try:
        turn(made.proxy, first_turn("the parser"), "A")
        wait_until(lambda: saves(made.proxy) >= 1, what="A saved")
        (a_file,) = made.files()
        turn(made.proxy, first_turn("the scheduler"), "B")
        wait_until(lambda: saves(made.proxy) >= 2, what="B saved")
        assert a_file not in made.files() and len(made.files()) == 1
        assert metric(made.proxy.url, "llamabridge_proxy_kv_evictions_total", {"reason": "budget"}) == 1
        assert metric(made.proxy.url, "llamabridge_proxy_kv_cache_files") == 1
        assert metric(made.proxy.url, "llamabridge_proxy_kv_cache_bytes") == (made.kv_dir / made.files()[0]).stat().st_size
    finally:
        made.stop()


def test_a_newer_file_of_a_conversation_replaces_the_older(stack):
    a1 = first_turn("the parser")
    turn(stack.proxy, a1, "A")
    wait_until(lambda: saves(stack.proxy) >= 1, what="turn 1 saved")
    (older,) = stack.files()
    turn(stack.proxy, next_turn(a1, "Read it.", "Go on."), "A")
    wait_until(lambda: saves(stack.proxy) >= 2, what="turn 2 saved")
    (newer,) = stack.files()
    assert newer != older
    assert metric(stack.proxy.url, "llamabridge_proxy_kv_evictions_total", {"reason": "superseded"}) == 1


def test_without_a_directory_nothing_is_saved_and_health_says_so(llama_server_bin, tiny_model, llama):
    with processes.proxy(llama.url, KV_CACHE_DIR="", KV_SAVE_IDLE="0") as proxy:
        turn(proxy, first_turn("the parser"), "A")
        assert requests.get(proxy.url + "/healthz", timeout=10).json()["kv_cache"] == "not persisted (KV_CACHE_DIR is not set)"
        assert saves(proxy) == 0


def test_claude_code_runs_again_after_a_restart_from_the_saved_cache(claude_bin, stack, tmp_path):
    from tests.test_claude_code import run_claude

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    first = run_claude(claude_bin, stack.proxy.url, home, work, "Say hello in one word.")
    assert first.returncode == 0, f"stdout={first.stdout!r}\nstderr={first.stderr!r}\n{stack.proxy.log_text()[-3000:]}"
    wait_until(lambda: saves(stack.proxy) >= 1, what="Claude Code's session saved")
    stack.restart_llama()
    second = run_claude(claude_bin, stack.proxy.url, home, work, "Say goodbye in one word.")
    assert second.returncode == 0, f"stdout={second.stdout!r}\nstderr={second.stderr!r}\n{stack.proxy.log_text()[-3000:]}"
    def both_runs_logged():
        found = requests.get(stack.proxy.url + "/api/requests", params={"class": "main"}, timeout=10).json()["requests"]
        return found if len({r["session"] for r in found}) == 2 else None
    mains = wait_until(both_runs_logged, what="both runs' main turns in the request log")
    latest = max(mains, key=lambda r: r["id"])
    first_of_second = min((r for r in mains if r["session"] == latest["session"]), key=lambda r: r["id"])
    served = first_of_second["prompt_tokens"] + first_of_second["cached_tokens"]
    assert first_of_second["kv_restored"] > 0.8 * served and first_of_second["cached_tokens"] > 0.9 * served, first_of_second
    shutil.rmtree(home, ignore_errors=True)


def test_a_llama_server_that_cannot_save_is_named_in_health_and_turns_go_on(llama, tmp_path):
    """KV_CACHE_DIR set, but llama-server was started without --slot-save-path (one started by hand)."""
    with processes.proxy(llama.url, KV_CACHE_DIR=str(tmp_path), KV_SAVE_IDLE="0") as proxy:
        turn(proxy, first_turn("the parser"), "A")
        wait_until(lambda: metric(proxy.url, "llamabridge_proxy_kv_save_failures_total", missing=0.0) >= 1, what="a failed save")
        health = requests.get(proxy.url + "/healthz", timeout=10).json()
        assert health["status"] == "ok" and "the last save failed: llama-server answered HTTP" in health["kv_cache"], health
        assert "could not save slot" in proxy.log_text()
        turn(proxy, next_turn(first_turn("the parser"), "Read it.", "Go on."), "A")
        assert saves(proxy) == 0 and list(tmp_path.iterdir()) == []
