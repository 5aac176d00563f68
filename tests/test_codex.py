"""The real Codex CLI (npm @openai/codex, installed by `make codex`) in `exec` mode through the
proxy to the real llama-server. Codex speaks only the Responses API, with a prompt of about
7k tokens and a dozen tools, and reports the usage it was told: the proxy's request log must
agree with it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import make_env, request_log
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def codex_config(proxy) -> str:
    """The config.toml lines `make env` prints for Codex (`python -m proxy env`), as a user copies them."""
    out = make_env.output(proxy.port)
    lines = make_env.block(out, "# Codex CLI")
    assert lines, out
    return "\n".join(lines) + "\n"


def run_codex(codex_bin: str, config: str, home: Path, cwd: Path, prompt: str) -> subprocess.CompletedProcess:
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(config)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "CODEX_HOME": str(home),
           "OPENAI_API_KEY": "sk-test-not-a-real-key"}
    return subprocess.run([codex_bin, "exec", "--json", "--skip-git-repo-check", prompt], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


def test_codex_exec_through_the_proxy_to_llama_server(codex_bin, bounded_proxy, tmp_path):
    proxy = bounded_proxy
    work = tmp_path / "work"
    work.mkdir()
    config = codex_config(proxy)
    assert 'wire_api = "responses"' in config and "model_context_window = 32768" in config
    result = run_codex(codex_bin, config, tmp_path / "codex-home", work, "Say hello in one word.")
    assert result.returncode == 0, f"stdout={result.stdout!r}\nstderr={result.stderr[-3000:]!r}\nproxy log:\n{proxy.log_text()[-3000:]}"
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kinds = [e["type"] for e in events]
    assert "turn.completed" in kinds and "turn.failed" not in kinds, events
    assert any(e["type"] == "item.completed" and e["item"]["type"] == "agent_message" for e in events), events
    thread = next(e["thread_id"] for e in events if e["type"] == "thread.started")

    # Codex names its session in a header; the proxy's request log keys the turn on it, with the
    # tokens llama-server reported, which are what Codex was told.
    def turn() -> list[request_log.Entry]:
        return [e for e in request_log.entries(proxy, route="/v1/responses", client="codex_exec/")
                if (e.klass, e.status, e.handled, e.session) == ("openai", 200, "upstream", thread)]

    entry = wait_until(turn, what="the request log line of Codex's turn")[0]
    prompt, cached, generated = entry.prompt, entry.cached, entry.generated
    usage = next(e["usage"] for e in events if e["type"] == "turn.completed")
    assert (usage["input_tokens"], usage["cached_input_tokens"], usage["output_tokens"]) == (prompt + cached, cached, generated)
    assert usage["input_tokens"] > 3000  # Codex's own prompt and tools, not a stub
    assert "sk-test-not-a-real-key" not in proxy.log_text()
