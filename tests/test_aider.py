"""Aider (PyPI aider-chat, installed by `make aider` into an environment of its own) through the
proxy to the real llama-server, set up with exactly what `make env` prints: its exports pasted
into a shell, and its model metadata line saved as ~/.aider.model.metadata.json. Aider reaches
the proxy through litellm and the OpenAI SDK, so this is also the OpenAI relay under a real agent."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import make_env, request_log
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

API_KEY = "sk-aider-test-not-a-real-key"


def aider_env(proxy, home: Path) -> dict[str, str]:
    """A user's environment after following `make env`: every export, and the metadata file.

    Not the user's: the tiny model's words are noise that may not end before the server's cap
    (Aider then reports a token limit instead of the usage), so a grammar, passed through Aider's
    own model settings file to llama-server, makes every reply one fixed word that ends in a stop."""
    out = make_env.output(proxy.port)
    exported = make_env.exports(out)
    metadata = make_env.block(out, "# Aider's context window")
    assert len(metadata) == 1 and metadata[0].startswith("{"), out
    home.mkdir(exist_ok=True)
    (home / ".aider.model.metadata.json").write_text(metadata[0] + "\n")
    settings = [{"name": exported["AIDER_MODEL"], "extra_params": {"extra_body": {"grammar": 'root ::= "Done."'}}}]
    (home / ".aider.model.settings.yml").write_text(json.dumps(settings))  # JSON is YAML
    # The user's own key (any value does) must not reach the proxy's log.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **exported, "OPENAI_API_KEY": API_KEY}


def run_aider(aider_bin: str, env: dict[str, str], cwd: Path, message: str, *files: str,
              stream: bool = True) -> subprocess.CompletedProcess:
    # Not a terminal, no git, no questions; no update check or analytics (no network here).
    flags = ["--no-git", "--yes-always", "--no-pretty", "--no-check-update", "--analytics-disable"]
    if not stream:
        flags.append("--no-stream")
    return subprocess.run([aider_bin, *flags, "--message", message, *files], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


@pytest.fixture
def workdir(tmp_path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    return work


def request_lines(proxy) -> list[request_log.Entry]:
    return request_log.entries(proxy, route="/v1/chat/completions")


def test_aider_sees_the_servers_context_window(aider_bin, bounded_proxy, workdir, tmp_path):
    """AIDER_MODEL and the metadata line make Aider size its context meter by the real window,
    instead of gpt-4o's (no model) or none at all (a model without metadata)."""
    result = run_aider(aider_bin, aider_env(bounded_proxy, tmp_path / "home"), workdir, "/tokens", "calc.py")
    assert result.returncode == 0, result
    assert "32,768 tokens max context window size" in result.stdout, result.stdout
    assert "Unknown context window" not in result.stdout + result.stderr


def test_aider_edits_through_the_proxy_and_reports_llama_servers_usage(aider_bin, bounded_proxy, workdir, tmp_path):
    proxy = bounded_proxy
    env = aider_env(proxy, tmp_path / "home")
    before = len(request_lines(proxy))
    streamed = run_aider(aider_bin, env, workdir, "Add a docstring to add.", "calc.py")
    assert streamed.returncode == 0, f"{streamed}\nproxy log:\n{proxy.log_text()[-3000:]}"
    wait_until(lambda: len(request_lines(proxy)) > before, what="the request log line of Aider's streamed turn")
    assert request_lines(proxy)[-1].status == 200, request_lines(proxy)[-1]

    # Without streaming, Aider prints the usage litellm was given, which is llama-server's: the
    # proxy's request log must say the same.
    before = len(request_lines(proxy))
    plain = run_aider(aider_bin, env, workdir, "Add a docstring to add.", "calc.py", stream=False)
    assert plain.returncode == 0, f"{plain}\nproxy log:\n{proxy.log_text()[-3000:]}"
    wait_until(lambda: len(request_lines(proxy)) > before, what="the request log line of Aider's turn")
    line = request_lines(proxy)[-1]
    assert (line.status, line.handled) == (200, "upstream") and line.client.startswith("OpenAI/Python "), line
    prompt, cached, generated = line.prompt, line.cached, line.generated
    report = re.search(r"Tokens: (\d+) sent, (?:(\d+) cache hit, )?(\d+) received\.", plain.stdout)
    assert report, plain.stdout
    assert int(report.group(1)) == prompt + cached and int(report.group(3)) == generated, (report.group(0), line)
    assert report.group(2) is None or int(report.group(2)) == cached
    assert prompt + cached > 400  # Aider's own system prompt and the file, not a stub
    assert API_KEY not in proxy.log_text()


def test_aider_warns_before_a_prompt_too_large_and_shows_llama_servers_refusal(aider_bin, bounded_proxy, workdir, tmp_path):
    """The window from `make env` lets Aider warn before sending; llama-server's 400 reaches it
    as the 400 it is (an error Aider shows and does not retry), not as a 5xx."""
    proxy = bounded_proxy
    (workdir / "big.py").write_text("".join(f'value_{i} = "{" ".join(["alpha beta gamma delta"] * 4)}"\n' for i in range(2000)))
    before = len(request_lines(proxy))
    result = run_aider(aider_bin, aider_env(proxy, tmp_path / "home"), workdir, "Add a docstring.", "big.py", stream=False)
    said = " ".join(result.stdout.split())  # Aider wraps its lines to the terminal's width
    assert "exceeds the 32,768 token limit for openai/" in said, said[-3000:]
    assert "exceeds the available context size (32768 tokens)" in said, said[-3000:]
    wait_until(lambda: len(request_lines(proxy)) > before, what="the request log line of the refused turn")
    assert [line.status == 400 for line in request_lines(proxy)[before:]] == [True], request_lines(proxy)[before:]
