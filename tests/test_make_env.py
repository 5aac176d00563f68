"""`make env FILE=...` (`python -m proxy env --file NAME`): one client's config file, whole, to
redirect into place. It must say exactly what the full `make env` prints for that client (the
agents' own tests run them with those lines), and parse as the file it stands for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import yaml

from llamabridge import keys as keyfile
from tests.support import make_env, processes

pytestmark = pytest.mark.integration


def env_file(port: int, which: str, **overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROXY_PORT=str(port), API_KEYS_FILE=str(processes.ROOT / "tests" / "no-such-keys.json"))
    return subprocess.run([sys.executable, "-m", "proxy", "env", "--file", which], capture_output=True, text=True,
                          timeout=60, cwd=processes.ROOT, env={**env, **overrides})


@pytest.fixture(scope="module")
def full(proxy) -> str:
    return make_env.output(proxy.port)


@pytest.mark.parametrize("which, header, parse", [
    ("aider", "# Aider's context window", json.loads),
    ("opencode", "# OpenCode:", json.loads),
    ("codex", "# Codex CLI:", tomllib.loads),
])
def test_a_config_file_says_what_make_env_prints_for_it(proxy, full, which, header, parse):
    result = env_file(proxy.port, which)
    assert result.returncode == 0, result
    assert parse(result.stdout) == parse("\n".join(make_env.block(full, header)))


def test_continues_file_is_a_whole_config_with_the_model_make_env_prints(proxy, full):
    result = env_file(proxy.port, "continue")
    assert result.returncode == 0, result
    config = yaml.safe_load(result.stdout)
    assert {key: config[key] for key in ("name", "version", "schema")} == {"name": "llamabridge", "version": "1.0.0", "schema": "v1"}
    assert config["models"] == yaml.safe_load("\n".join(make_env.block(full, "# Continue (")))["models"]
    assert config["models"][0]["defaultCompletionOptions"] == {"contextLength": 32768}
    assert config["models"][0]["apiBase"] == f"http://127.0.0.1:{proxy.port}/v1"


def test_no_config_file_without_the_window():
    """Nothing answering: no half-right file on stdout (it would be redirected into place), the
    reason on stderr, a failing exit status."""
    port = processes.free_port()
    result = env_file(port, "opencode", LLAMA_URL=f"http://127.0.0.1:{port}")
    assert result.returncode == 1 and result.stdout == "", result
    assert "context window is unknown" in result.stderr


def test_with_keys_it_names_the_key_everywhere_a_client_takes_one(llama, tmp_path):
    """Once the proxy has keys, every client's lines carry the key (a placeholder until you give
    yours as LLAMABRIDGE_API_KEY), Codex's provider names the variable it sends it from, and
    Cline's CLI gets its one-line setup."""
    keys_file = tmp_path / "keys.json"
    key = keyfile.add(keys_file, "env-user")
    with processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        for given, expected in (("", "YOUR_LLAMABRIDGE_KEY"), (key, key)):
            out = make_env.output(proxy.port, API_KEYS_FILE=str(tmp_path / "elsewhere.json"), LLAMABRIDGE_API_KEY=given, LLAMA_URL=llama.url)
            exported = make_env.exports(out)
            assert exported["ANTHROPIC_API_KEY"] == exported["OPENAI_API_KEY"] == expected
            assert exported["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "32768"  # asked with the key, or of llama-server
            assert f"-k {expected} -m " in make_env.block(out, "# Cline's CLI")[0]
            assert f"API Key: {expected}" in out
            assert yaml.safe_load("\n".join(make_env.block(out, "# Continue (")))["models"][0]["apiKey"] == expected
            assert json.loads(make_env.block(out, "# OpenCode:")[0])["provider"]["llamabridge"]["options"]["apiKey"] == expected
            assert tomllib.loads("\n".join(make_env.block(out, "# Codex CLI:")))["model_providers"]["llamabridge"]["env_key"] == "OPENAI_API_KEY"
        assert "asks for an API key" in make_env.output(proxy.port, LLAMABRIDGE_API_KEY="")
        opencode = env_file(proxy.port, "opencode", LLAMABRIDGE_API_KEY=key)
        assert json.loads(opencode.stdout)["provider"]["llamabridge"]["options"]["apiKey"] == key


def test_without_keys_any_key_does_and_codex_is_not_told_to_send_one(proxy, full):
    assert make_env.exports(full)["ANTHROPIC_API_KEY"] == "llamabridge" and "asks for no API key" in full
    assert "env_key" not in tomllib.loads("\n".join(make_env.block(full, "# Codex CLI:")))["model_providers"]["llamabridge"]
    assert make_env.block(full, "# Cline's CLI")[0] == f"cline auth -p openai -b {proxy.url}/v1 -k llamabridge -m {json.loads(make_env.block(full, '# OpenCode:')[0])['model'].split('/', 1)[1]}"
