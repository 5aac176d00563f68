"""The real Claude Code CLI (npm @anthropic-ai/claude-code, installed by `make claude-code`)
in `-p` mode through the proxy: to the real llama-server, and, for a full tool round trip,
to the scripted upstream (see tests/support/scripted_upstream.py for why that one is scripted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import requests

from llamabridge import keys as keyfile
from tests.support import make_env, processes, request_log
from tests.support.prom import metric
from tests.support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.integration


def run_claude(claude_bin: str, base_url: str, home: Path, cwd: Path, prompt: str, *extra: str, timeout: float = 240,
               key: dict[str, str] | None = None):
    """`claude -p prompt`; `key` is how it is given its API key (ANTHROPIC_API_KEY by default)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        **(key or {"ANTHROPIC_API_KEY": "sk-test-not-a-real-key"}),
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # The tiny model's words are random and sometimes never end: bound each reply.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64",
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "32768",
    }
    return subprocess.run([claude_bin, "-p", prompt, "--model", "claude-sonnet-4-5", *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_claude_code_print_mode_through_the_proxy_to_llama_server(claude_bin, proxy, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    before = proxy.log_text().count('llamabridge.request: /v1/messages ')
    result = run_claude(claude_bin, proxy.url, home, work, "Say hello in one word.")
    assert result.returncode == 0, f"stdout={result.stdout!r}\nstderr={result.stderr!r}\nproxy log:\n{proxy.log_text()[-3000:]}"
    assert result.stdout.strip(), "Claude Code printed nothing"
    assert "API Error" not in result.stdout
    assert proxy.log_text().count('llamabridge.request: /v1/messages ') > before
    assert "sk-test-not-a-real-key" not in proxy.log_text()


def test_claude_code_runs_a_bash_tool_call_and_finishes(claude_bin, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    command = "echo llamabridge-tool-ran > marker.txt && echo tool-output-42"
    with ScriptedUpstream(command) as upstream, processes.proxy(upstream.url) as proxy:
        result = run_claude(claude_bin, proxy.url, home, work, "Run the scripted command.", "--allowedTools", "Bash")
        chats = [r["body"] for r in upstream.requests if r["path"] == "/v1/chat/completions" and r["body"].get("tools")]
    assert result.returncode == 0, f"stdout={result.stdout!r}\nstderr={result.stderr!r}"
    # Claude Code ran the tool the model asked for ...
    assert (work / "marker.txt").read_text().strip() == "llamabridge-tool-ran"
    # ... sent its output back as a tool message (translated from tool_result) ...
    assert len(chats) >= 2, json.dumps(chats)[:2000]
    last = chats[-1]["messages"]
    tool_messages = [m for m in last if m["role"] == "tool"]
    assert tool_messages and "tool-output-42" in tool_messages[-1]["content"]
    assistant = [m for m in last if m["role"] == "assistant" and m.get("tool_calls")][-1]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"])["command"] == command
    assert tool_messages[-1]["tool_call_id"] == assistant["tool_calls"][0]["id"]
    # ... and printed the model's final answer.
    assert "The command printed: tool-output-42" in result.stdout


def test_make_env_makes_claude_code_see_the_servers_real_context_window(claude_bin, proxy, llama, tmp_path):
    """`make env`'s lines, pasted into a shell, are what Claude Code's `/context` shows as the window.

    This server's 32768 tokens are below the 100k from which Claude Code honours
    CLAUDE_CODE_AUTO_COMPACT_WINDOW, and for its own model names (its default among them) it
    ignores CLAUDE_CODE_MAX_CONTEXT_TOKENS; so the lines must also name a model it does not know."""
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    exported = make_env.exports(make_env.output(proxy.port))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **exported}
    result = subprocess.run([claude_bin, "-p", "/context"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    window = re.search(r"\*\*Tokens:\*\* \S+ / (\S+) ", result.stdout)
    assert window, result.stdout
    assert window.group(1) == f"{n_ctx / 1000:.1f}k", result.stdout  # "32.8k" for 32768


@pytest.fixture(scope="module")
def keyed_proxy(llama, tmp_path_factory):
    """A proxy with one key, as a shared box runs it."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key = keyfile.add(keys_file, "claude-user")
    with processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        proxy.key = key
        yield proxy


@pytest.mark.parametrize("variable", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
def test_claude_code_with_its_key_completes_through_a_keyed_proxy(claude_bin, keyed_proxy, tmp_path, variable):
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    result = run_claude(claude_bin, keyed_proxy.url, tmp_path / "home", tmp_path / "work", "Say hello in one word.",
                        key={variable: keyed_proxy.key})
    assert result.returncode == 0, f"stdout={result.stdout!r}\nstderr={result.stderr!r}\nproxy log:\n{keyed_proxy.log_text()[-3000:]}"
    assert result.stdout.strip() and "API Error" not in result.stdout
    turns = [e for e in request_log.entries(keyed_proxy, route="/v1/messages", client="claude-cli/") if e.status == 200]
    assert turns and {e.user for e in turns} == {"claude-user"}
    assert keyed_proxy.key not in keyed_proxy.log_text()


def test_claude_code_with_a_wrong_key_says_so_and_stops_at_once(claude_bin, keyed_proxy, tmp_path):
    """A 401 says it is final (X-Should-Retry): Claude Code reports the key and exits, instead of
    retrying it with backoff for minutes."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    def refused() -> float:
        return metric(keyed_proxy.url, "llamabridge_proxy_refused_requests_total", {"reason": "key"}, headers={"x-api-key": keyed_proxy.key})

    before = refused()
    result = run_claude(claude_bin, keyed_proxy.url, tmp_path / "home", tmp_path / "work", "Say hello in one word.",
                        key={"ANTHROPIC_API_KEY": "llb-not-this-one"}, timeout=120)
    assert result.returncode != 0
    assert "Failed to authenticate" in result.stdout + result.stderr and "API key is not valid" in result.stdout + result.stderr
    assert refused() - before <= 2, "Claude Code retried the refused key"
