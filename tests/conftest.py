"""Shared fixtures: the real llama-server on the tiny generated model, the real proxy, captures.

The binaries and the model come from the Makefile (`make test` sets LLAMA_SERVER_BIN,
RPC_SERVER_BIN, TINY_MODEL, CLAUDE_BIN, CODEX_BIN, AIDER_BIN, OPENCODE_BIN, CONTINUE_BIN and CLINE_BIN). A missing prerequisite fails, naming the target that provides it:
nothing in this suite is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support import processes

# The generated tests (hypothesis) try the same examples on every run, CI included, and keep no
# example database in the work tree; each test sets only how many examples it tries.
settings.register_profile("llamabridge", derandomize=True, database=None, deadline=None, print_blob=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("llamabridge")

# A developer's own .env must not change what the services under test do; tests that read a
# .env file point LLAMABRIDGE_ENV_FILE at their own.
os.environ["LLAMABRIDGE_ENV_FILE"] = os.devnull

ROOT = Path(__file__).resolve().parents[1]
CAPTURE_CANDIDATES = [
    ROOT / "tests" / "fixtures" / "claude-code-2.1.328-session.jsonl",
]


def _prerequisite(name: str, var: str, target: str):
    """A session fixture `name`: the path in $var (which `make test` sets), or a failure naming the
    make target that provides it."""
    def path() -> str:
        value = os.environ.get(var, "")
        if not value or not Path(value).exists():
            pytest.fail(f"{var} is not set to an existing file: run `make test`, or `make {target}` and export {var}", pytrace=False)
        return value

    return pytest.fixture(scope="session", name=name)(path)


llama_server_bin = _prerequisite("llama_server_bin", "LLAMA_SERVER_BIN", "llama-server")
rpc_server_bin = _prerequisite("rpc_server_bin", "RPC_SERVER_BIN", "rpc-server")
tiny_model = _prerequisite("tiny_model", "TINY_MODEL", "tiny-model")
claude_bin = _prerequisite("claude_bin", "CLAUDE_BIN", "claude-code")
codex_bin = _prerequisite("codex_bin", "CODEX_BIN", "codex")
aider_bin = _prerequisite("aider_bin", "AIDER_BIN", "aider")
litellm_bin = _prerequisite("litellm_bin", "LITELLM_BIN", "litellm")
opencode_bin = _prerequisite("opencode_bin", "OPENCODE_BIN", "opencode")
continue_bin = _prerequisite("continue_bin", "CONTINUE_BIN", "continue-cli")
cline_bin = _prerequisite("cline_bin", "CLINE_BIN", "cline")


@pytest.fixture(scope="session")
def llama(llama_server_bin, tiny_model):
    """One real llama-server for the session: 1 slot, 32768 tokens of context (Claude Code's prompt is ~20k), -t 1."""
    with processes.llama_server(llama_server_bin, tiny_model) as server:
        yield server


@pytest.fixture(scope="session")
def proxy(llama):
    with processes.proxy(llama.url) as server:
        yield server


@pytest.fixture(scope="module")
def bounded_proxy(llama_server_bin, tiny_model):
    """A proxy on a llama-server of its own that caps every reply at 64 tokens (-n), for agents
    that send no output limit (Codex, Aider): the tiny model's words sometimes never end."""
    with processes.llama_server(llama_server_bin, tiny_model, extra=["-n", "64"]) as llama, processes.proxy(llama.url) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def other_model(tiny_model) -> str:
    """A second generated model: one more layer, so another model in every respect llama-server reports."""
    out = subprocess.run([sys.executable, "llama/tiny_model.py", "--layers", "3"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert Path(out).exists() and out != tiny_model
    return out


@pytest.fixture(scope="session")
def capture() -> list[dict]:
    """The recorded Claude Code 2.1.328 session: one dict per request (method, path, headers, body)."""
    path = next((p for p in CAPTURE_CANDIDATES if p.exists()), None)
    assert path is not None, f"no capture at {CAPTURE_CANDIDATES}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def capture_messages(capture) -> list[dict]:
    """Bodies of the capture's POST /v1/messages requests."""
    return [r["body"] for r in capture if r["method"] == "POST" and r["path"].split("?")[0] == "/v1/messages"]
