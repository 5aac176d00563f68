"""The real Cline CLI (npm cline, installed by `make cline`) through a proxy with keys, set up
with exactly the one line `make env` prints for it (`cline auth -p openai ...`): a task completes
with the right key, and the wrong key is reported at once, with one request, not retried.

Cline talks to nothing but the base URL here: its telemetry and feature flags (cline.bot) are
turned off in its settings file and by E2E_TEST, its update check by CLINE_NO_AUTO_UPDATE, and
CLINE_SESSION_BACKEND_MODE=local keeps it from starting its background "hub" process."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from llamabridge import keys as keyfile
from tests.support import make_env, processes, request_log
from tests.support.prom import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keyed(llama_server_bin, tiny_model, tmp_path_factory):
    """A proxy with one key, on a llama-server that caps every reply at 64 tokens (-n): Cline
    sends no output limit, and the tiny model's words sometimes never end."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key = keyfile.add(keys_file, "cline-user")
    with processes.llama_server(llama_server_bin, tiny_model, extra=["-n", "64"]) as llama, \
            processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        proxy.key = key
        proxy.llama = llama
        yield proxy


def cline_env(home: Path) -> dict[str, str]:
    settings = home / ".cline" / "data" / "settings"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "global-settings.json").write_text(json.dumps({"telemetryOptOut": True, "autoUpdateEnabled": False}))
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "CLINE_SESSION_BACKEND_MODE": "local",
            "E2E_TEST": "true", "CLINE_NO_AUTO_UPDATE": "1"}


def cline(cline_bin: str, env: dict[str, str], *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    # Prompt in the arguments and nothing on stdin: Cline appends whatever stdin holds to the prompt.
    return subprocess.run([cline_bin, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def set_up(cline_bin: str, proxy, home: Path, work: Path, key: str) -> dict[str, str]:
    """`cline auth ...` as `make env` prints it for this key."""
    out = make_env.output(proxy.port, LLAMA_URL=proxy.llama.url, LLAMABRIDGE_API_KEY=key)
    line = make_env.block(out, "# Cline's CLI")[0]
    words = shlex.split(line)
    assert words[:4] == ["cline", "auth", "-p", "openai"] and words[words.index("-k") + 1] == key, line
    # The settings line's Model ID is the model's short name, as in the CLI line, not the path of
    # the model file (llama-server's own name for a model started without an alias).
    settings = make_env.block(out, "# Cline (settings")[0]
    model = words[words.index("-m") + 1]
    assert f"Model ID: {model} " in settings and "/" not in model and model.endswith(".gguf"), settings
    env = cline_env(home)
    auth = cline(cline_bin, env, *words[1:], cwd=work)
    assert auth.returncode == 0, (auth.stdout, auth.stderr)
    return env


def events(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_cline_completes_a_task_with_its_key(cline_bin, keyed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = set_up(cline_bin, keyed, tmp_path / "home", work, keyed.key)
    result = cline(cline_bin, env, "--json", "-c", str(work), "Say hello in one word.", cwd=work)
    assert result.returncode == 0, f"stdout={result.stdout[-3000:]!r}\nstderr={result.stderr[-3000:]!r}"
    final = events(result)[-1]
    assert final["type"] == "run_result" and final["finishReason"] == "completed", final
    turns = wait_until(lambda: [e for e in request_log.entries(keyed, route="/v1/chat/completions", client="ai-sdk/")
                                if e.status == 200], what="Cline's request in the proxy's log")
    assert {e.user for e in turns} == {"cline-user"}
    # Cline's own prompt and tools, counted as llama-server counted them.
    assert final["usage"]["inputTokens"] == sum(e.prompt + e.cached for e in turns) > 2000
    assert final["usage"]["outputTokens"] == sum(e.generated for e in turns)
    assert keyed.key not in keyed.log_text()


def test_cline_reports_a_wrong_key_at_once(cline_bin, keyed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = set_up(cline_bin, keyed, tmp_path / "home", work, "llb-not-this-one")

    def refused() -> float:
        return metric(keyed.url, "llamabridge_proxy_refused_requests_total", {"reason": "key"}, headers={"x-api-key": keyed.key})

    before = refused()
    result = cline(cline_bin, env, "--json", "-c", str(work), "Say hello in one word.", cwd=work, timeout=120)
    assert result.returncode != 0
    final = events(result)[-1]
    assert final["type"] == "run_result" and final["finishReason"] == "error", final
    assert "API key is not valid" in final["text"]
    assert refused() - before == 1  # one request: an auth error is not retried
