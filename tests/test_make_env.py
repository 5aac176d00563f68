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

from tests.support import make_env, processes

pytestmark = pytest.mark.integration


def env_file(port: int, which: str, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "env", "--file", which], capture_output=True, text=True,
                          timeout=60, cwd=processes.ROOT, env=dict(os.environ, PROXY_PORT=str(port), **overrides))


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
