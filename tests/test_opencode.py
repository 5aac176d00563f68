"""OpenCode (npm opencode-ai, installed by `make opencode`) through the proxy to the real
llama-server, set up with exactly what `make env` prints: its OpenCode line saved as the
project's opencode.json. OpenCode reaches the proxy through the AI SDK's OpenAI-compatible
provider, streaming, so this is also the OpenAI relay under another real agent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import make_env, processes, request_log
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

API_KEY = "sk-opencode-test-not-a-real-key"


def opencode_config(proxy) -> dict:
    """The config `make env` prints for OpenCode, with the user's own key (any value does) in it."""
    out = make_env.output(proxy.port)
    lines = make_env.block(out, "# OpenCode:")
    assert len(lines) == 1, out
    config = json.loads(lines[0])
    config["provider"]["llamabridge"]["options"]["apiKey"] = API_KEY
    return config


def setup(proxy, tmp_path: Path) -> tuple[dict[str, str], Path, dict]:
    """A project holding `make env`'s opencode.json, and a home of its own for OpenCode's state."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    config = opencode_config(proxy)
    (work / "opencode.json").write_text(json.dumps(config, indent=2))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           **{f"XDG_{kind}_HOME": str(home / kind.lower()) for kind in ("CONFIG", "DATA", "CACHE", "STATE")},
           # No network here: no update check, no model catalogue download, no language servers.
           "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1"}
    return env, work, config


def run_opencode(opencode_bin: str, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([opencode_bin, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)


def events(result: subprocess.CompletedProcess) -> list[dict]:
    """`opencode run --format json`: one JSON event per line."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def logged(proxy) -> list[tuple[int | None, str, int, int, int]]:
    """(status, session, prompt, cached, generated) of every OpenCode request in the proxy's request log."""
    return [(e.status, e.session, e.prompt, e.cached, e.generated) for e in request_log.entries(proxy, client="opencode/")
            if e.handled == "upstream"]


def test_opencode_runs_through_the_proxy_with_the_servers_window_and_its_usage(opencode_bin, bounded_proxy, tmp_path):
    proxy = bounded_proxy
    env, work, config = setup(proxy, tmp_path)
    n_ctx = config["provider"]["llamabridge"]["models"][config["model"].split("/", 1)[1]]["limit"]["context"]

    # OpenCode takes the provider and reads the model's window and output reserve from the file.
    listed = run_opencode(opencode_bin, env, work, "models", "llamabridge", "--verbose")
    assert listed.returncode == 0, listed
    model = json.loads(listed.stdout[listed.stdout.index("{"):])
    assert model["limit"] == {"context": 32768, "output": 8192} and n_ctx == 32768, model

    before = len(logged(proxy))
    result = run_opencode(opencode_bin, env, work, "run", "--format", "json", "Say hello.")
    assert result.returncode == 0, f"{result}\nproxy log:\n{proxy.log_text()[-3000:]}"
    steps = [e["part"]["tokens"] for e in events(result) if e["type"] == "step_finish"]
    assert steps, result.stdout
    session = events(result)[0]["sessionID"]
    # The session title and every step of the answer went through the proxy and were answered.
    wait_until(lambda: len(logged(proxy)) >= before + len(steps) + 1, what="the request log lines of OpenCode's turn")
    requests = logged(proxy)[before:]
    assert all(status == 200 for status, *_ in requests), requests
    # Every request, the title's too, names OpenCode's session (X-Session-Id), as the request log
    # and the dashboard's sessions show it, and as the gate keeps each session on its slot.
    assert {s for _, s, *_ in requests} == {session}, (session, requests)
    # What OpenCode counts for each step is llama-server's usage, cache hits included, as the
    # proxy logged it: the streamed relay passes the final usage chunk on as it came.
    for tokens in steps:
        assert (200, session, tokens["input"], tokens["cache"]["read"], tokens["output"]) in requests, (tokens, requests)
    # OpenCode's system prompt and tools, not a stub.
    assert all(t["input"] + t["cache"]["read"] > 4000 for t in steps), steps
    assert API_KEY not in proxy.log_text()


def test_opencode_compacts_before_the_window_is_full(opencode_bin, llama_server_bin, tiny_model, tmp_path):
    """With `make env`'s limits OpenCode summarizes the conversation once a step has used the
    window less the output it reserves, before llama-server would have to refuse a turn. On a
    12,288-token window OpenCode's own prompt (about 8k tokens) and one long message reach that."""
    with processes.llama_server(llama_server_bin, tiny_model, ctx=12288, extra=["-n", "64"]) as llama, \
            processes.proxy(llama.url) as proxy:
        env, work, config = setup(proxy, tmp_path)
        limit = next(iter(config["provider"]["llamabridge"]["models"].values()))["limit"]
        assert limit == {"context": 12288, "output": 3072}, limit
        first = run_opencode(opencode_bin, env, work, "run", "--format", "json", "Say hello.")
        assert first.returncode == 0, first
        long = " ".join(f"item {i} is on the list." for i in range(250))  # about 2,400 tokens
        second = run_opencode(opencode_bin, env, work, "run", "--continue", "--format", "json", f"Remember these: {long}")
        assert second.returncode == 0, f"{second}\nproxy log:\n{proxy.log_text()[-3000:]}"
        used = [e["part"]["tokens"]["total"] for e in events(second) if e["type"] == "step_finish"]
        assert used and used[0] >= 12288 - 3072, used
        exported = run_opencode(opencode_bin, env, work, "export", events(second)[0]["sessionID"])
        assert exported.returncode == 0, exported
        parts = [p for m in json.loads(exported.stdout[exported.stdout.index("{"):])["messages"] for p in m["parts"]]
        assert any(p["type"] == "compaction" for p in parts), [p["type"] for p in parts]
        # The conversation went on from the summary, and no request was refused for its length.
        assert used[-1] < used[0], used
        assert logged(proxy) and all(status == 200 for status, *_ in logged(proxy)), logged(proxy)
