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

from llamabridge import keys as keyfile
from tests.support import make_env, processes, request_log
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def codex_config(proxy, **env: str) -> str:
    """The config.toml lines `make env` prints for Codex (`python -m proxy env`), as a user copies them."""
    out = make_env.output(proxy.port, **env)
    lines = make_env.block(out, "# Codex CLI")
    assert lines, out
    return "\n".join(lines) + "\n"


def run_codex(codex_bin: str, config: str, home: Path, cwd: Path, prompt: str, key: str = "sk-test-not-a-real-key",
              timeout: float = 240) -> subprocess.CompletedProcess:
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(config)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "CODEX_HOME": str(home),
           "OPENAI_API_KEY": key}
    return subprocess.run([codex_bin, "exec", "--json", "--skip-git-repo-check", prompt], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


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


def test_codex_with_the_key_make_env_names_and_with_a_wrong_one(codex_bin, llama_server_bin, tiny_model, tmp_path):
    """With keys on, `make env` names the variable Codex sends its key from (env_key); Codex then
    works with the right key and reports the wrong one."""
    keys_file = tmp_path / "keys.json"
    key = keyfile.add(keys_file, "codex-user")
    with processes.llama_server(llama_server_bin, tiny_model, extra=["-n", "64"]) as llama, \
            processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        config = codex_config(proxy, API_KEYS_FILE=str(keys_file), LLAMABRIDGE_API_KEY=key)
        assert 'env_key = "OPENAI_API_KEY"' in config and "model_context_window = 32768" in config
        work = tmp_path / "work"
        work.mkdir()
        result = run_codex(codex_bin, config, tmp_path / "home", work, "Say hello in one word.", key=key)
        assert result.returncode == 0, f"stdout={result.stdout!r}\nstderr={result.stderr[-3000:]!r}"
        assert wait_until(lambda: [e for e in request_log.entries(proxy, route="/v1/responses", client="codex_exec/")
                                   if e.status == 200 and e.user == "codex-user"], what="Codex's turn as codex-user")
        wrong = run_codex(codex_bin, config, tmp_path / "home-wrong", work, "Say hello in one word.", key="llb-not-this-one", timeout=120)
        assert wrong.returncode != 0
        assert "API key is not valid" in wrong.stdout + wrong.stderr, (wrong.stdout[-2000:], wrong.stderr[-2000:])
        # Without env_key (the lines for a proxy without keys) Codex sends no key at all.
        keyless = config.replace('env_key = "OPENAI_API_KEY"\n', "")
        missing = run_codex(codex_bin, keyless, tmp_path / "home-missing", work, "Say hello in one word.", key=key, timeout=120)
        assert missing.returncode != 0
        assert "needs an API key" in missing.stdout + missing.stderr, (missing.stdout[-2000:], missing.stderr[-2000:])
        assert key not in proxy.log_text()
