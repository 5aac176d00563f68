"""Continue's command-line agent (npm @continuedev/cli, `cn`, installed by `make continue-cli`)
through the proxy to the real llama-server, set up with exactly what `make env` prints: its
Continue lines as the models of ~/.continue/config.yaml, the file Continue's IDE extensions read
too. Continue reaches the proxy through the OpenAI JS SDK, streaming."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import make_env, request_log
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

API_KEY = "sk-continue-test-not-a-real-key"


def setup(proxy, tmp_path: Path, *, window: bool = True) -> tuple[dict[str, str], Path, Path]:
    """A home whose ~/.continue/config.yaml holds `make env`'s Continue lines (without its
    contextLength when `window` is false), with the user's own key (any value does)."""
    out = make_env.output(proxy.port)
    lines = make_env.block(out, "# Continue (")
    assert lines[0] == "models:" and any("contextLength: 32768" in line for line in lines), out
    if not window:
        lines = [line for line in lines if "defaultCompletionOptions" not in line and "contextLength" not in line]
    lines = [line.replace("apiKey: llamabridge", f"apiKey: {API_KEY}") for line in lines]
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".continue").mkdir(parents=True)
    work.mkdir()
    config = home / ".continue" / "config.yaml"
    config.write_text("name: llamabridge\nversion: 1.0.0\nschema: v1\n" + "\n".join(lines) + "\n")
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}, work, config


def run_cn(continue_bin: str, env: dict[str, str], cwd: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([continue_bin, "-p", "--config", str(config), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, stdin=subprocess.DEVNULL)


def logged(proxy) -> list[tuple[int | None, int, int, int]]:
    """(status, prompt, cached, generated) of every generation in the proxy's request log."""
    return [(e.status, e.prompt, e.cached, e.generated) for e in request_log.entries(proxy, route="/v1/chat/completions")
            if e.handled == "upstream"]


def test_continue_answers_through_the_proxy_and_records_llama_servers_usage(continue_bin, bounded_proxy, tmp_path):
    proxy = bounded_proxy
    env, work, config = setup(proxy, tmp_path)
    before = len(logged(proxy))
    result = run_cn(continue_bin, env, work, config, "Say hello.")
    assert result.returncode == 0 and result.stdout.strip(), f"{result}\nproxy log:\n{proxy.log_text()[-3000:]}"
    wait_until(lambda: len(logged(proxy)) > before, what="the request log line of Continue's turn")
    requests = logged(proxy)[before:]
    assert all(status == 200 for status, *_ in requests), requests
    # Continue keeps the usage of each answer with the session: llama-server's, as the proxy logged it.
    (session,) = (home_file for home_file in (Path(env["HOME"]) / ".continue" / "sessions").glob("*.json")
                  if home_file.name != "sessions.json")
    usage = json.loads(session.read_text())["history"][-1]["message"]["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert (200, usage["prompt_tokens"] - cached, cached, usage["completion_tokens"]) in requests, (usage, requests)
    assert usage["prompt_tokens"] > 1000  # Continue's own system prompt and tools, not a stub
    assert API_KEY not in proxy.log_text()


@pytest.mark.parametrize("window", [True, False], ids=["make-env", "no-context-length"])
def test_continue_refuses_a_message_larger_than_the_window_before_sending_it(continue_bin, bounded_proxy, tmp_path, window):
    """With `make env`'s contextLength, Continue checks a message against the real window and says
    it does not fit; without it, it assumes 200,000 tokens and sends what llama-server refuses."""
    proxy = bounded_proxy
    env, work, config = setup(proxy, tmp_path, window=window)
    listing = work / "list.txt"
    listing.write_text(" ".join(f"item {i} is on the list." for i in range(6000)))  # 130k tokens to the tiny model
    before = len(logged(proxy))
    result = run_cn(continue_bin, env, work, config, "--prompt", str(listing), "Summarize the list above.")
    if window:
        assert result.returncode != 0, result
        assert "context_limit (32,768)" in result.stdout + result.stderr, result
        assert logged(proxy)[before:] == []
    else:
        wait_until(lambda: len(logged(proxy)) > before, what="the request log line of the refused turn")
        assert [status for status, *_ in logged(proxy)[before:]][:1] == [400], logged(proxy)[before:]
        assert result.returncode != 0 and "exceeds the available context size (32768 tokens)" in result.stdout + result.stderr, result
