"""Pure pieces around the services: the bounded `client` label, reading .env, the request log,
and what either service says at start-up about a store it cannot open."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from llamabridge.settings import load_env_file
from proxy.metrics import Call, ClientLabels, client_family
from tests.support.waiting import wait_until


def test_client_family_drops_versions_and_keeps_the_agent():
    assert client_family("claude-cli/2.1.328 (external, cli)") == "claude-cli"
    assert client_family("Anthropic/Python 2.12.0") == "anthropic/python"
    assert client_family("OpenAI/Python 3.54.0") == "openai/python"
    assert client_family("python-requests/2.34.2") == "python-requests"
    assert client_family("Mozilla/5.0 (X11; Linux x86_64)") == "mozilla"
    assert client_family("") == client_family("-") == "unknown"
    assert client_family("Evil\"Agent{x}/1") == "evilagentx"  # only characters safe in a label value


def test_client_labels_are_bounded():
    labels = ClientLabels(limit=3)
    assert [labels(f"agent{i}/1.0") for i in range(5)] == ["agent0", "agent1", "agent2", "other", "other"]
    assert labels("agent1/2.0") == "agent1"  # a known family stays itself


def test_a_request_names_its_session_the_way_its_agent_does():
    claude_code = {"HTTP_X_CLAUDE_CODE_SESSION_ID": " 3f2a ", "HTTP_SESSION_ID": "other"}
    codex = {"HTTP_SESSION_ID": "01a2457f", "HTTP_USER_AGENT": "codex_exec/0.171.0"}
    assert Call.of("/v1/messages", claude_code).session == Call.of("/v1/chat/completions", claude_code).session == "3f2a"
    assert Call.of("/v1/responses", codex).session == "01a2457f"
    opencode = {"HTTP_X_SESSION_ID": "ses_db7e", "HTTP_X_SESSION_AFFINITY": "ses_db7e", "HTTP_USER_AGENT": "opencode/1.18.33"}
    assert Call.of("/v1/chat/completions", opencode).session == "ses_db7e"
    # On the Anthropic routes a named session means Claude Code to the classifier: Codex's and
    # OpenCode's headers are not one.
    assert Call.of("/v1/messages", codex).session is None
    assert Call.of("/v1/messages", opencode).session is None
    assert Call.of("/v1/responses", {}).session is None


def test_env_file_fills_only_unset_variables(tmp_path):
    path = tmp_path / "settings.env"
    path.write_text('# comment\nPROXY_PORT=9999\nexport QUEUE_MAX="12"\nLLAMA_URL=http://from-file:8080\n')
    env = {"LLAMABRIDGE_ENV_FILE": str(path), "LLAMA_URL": "http://from-environment:8080"}
    assert load_env_file(env) == str(path)
    assert env["PROXY_PORT"] == "9999" and env["QUEUE_MAX"] == "12"
    assert env["LLAMA_URL"] == "http://from-environment:8080"  # the environment wins, as with Compose
    assert load_env_file({"LLAMABRIDGE_ENV_FILE": str(tmp_path / "absent.env")}) is None


def test_request_log_writes_in_the_background_and_drops_the_newest_rather_than_blocks(tmp_path, monkeypatch):
    from llamabridge import requestlog

    now = time.time()  # rows from 1970 would be retention's to delete
    log = requestlog.RequestLog(str(tmp_path / "log.db"))
    for i in range(3):
        log.add({"ts": now + i, "route": "/v1/messages", "status": 200})
    wait_until(lambda: len(log.store.requests()) == 3, timeout=10, what="the rows to be written")
    assert log.dropped == 0

    monkeypatch.setattr(requestlog, "FLUSH_SECONDS", 3600)  # a writer that has stalled
    monkeypatch.setattr(requestlog, "QUEUE_SIZE", 2)
    stalled = requestlog.RequestLog(str(tmp_path / "stalled.db"))
    for i in range(5):
        stalled.add({"ts": float(i), "route": "/v1/messages", "status": 200})
    assert stalled.dropped == 3  # the newest: the rows kept are every row up to the stall, in order
    assert [row["ts"] for row in stalled._rows] == [0.0, 1.0]
    stalled.close()  # the two kept rows written, the drops logged here rather than at interpreter exit
    assert len(stalled.store.requests()) == 2


def test_request_log_drops_only_the_row_the_store_refuses(tmp_path):
    """A row SQLite can never take (here a value it cannot bind) is not retried forever, holding
    back every row behind it: its batch is written row by row, and only it is dropped."""
    from llamabridge import requestlog

    now = time.time()
    log = requestlog.RequestLog(str(tmp_path / "log.db"))
    for i in range(5):
        log.add({"ts": now + i, "route": "/v1/messages", "status": 200, "client": object() if i == 2 else "x"})
    wait_until(lambda: len(log.store.requests()) == 4 and log.pending() == 0, timeout=10, what="the other rows to be written")
    assert log.dropped == 1 and sorted(r["ts"] - now for r in log.store.requests()) == [0.0, 1.0, 3.0, 4.0]


def test_fastjson_matches_the_standard_library_and_falls_back_where_orjson_refuses():
    import json

    import pytest

    from proxy import fastjson

    body = {"b": [1, 2.5, None, True], "a": "héllo \u2028 \"quoted\" \n", "nested": {"z": 1, "y": [{}]}}
    assert fastjson.dumps(body) == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert fastjson.dumps(body, sort_keys=True) == json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
    assert fastjson.loads(fastjson.dumps(body)) == body
    huge = {"max_tokens": 10**30}  # beyond 64 bits: orjson refuses to write it, the standard library does
    assert json.loads(fastjson.dumps(huge)) == huge
    assert fastjson.loads('{"t": NaN}')["t"] != fastjson.loads('{"t": NaN}')["t"]  # NaN, as json.loads reads it
    with pytest.raises(json.JSONDecodeError) as error:
        fastjson.loads('{"a": 1,\n "b": }')
    assert (error.value.lineno, error.value.colno) == (2, 7)


def test_a_store_that_cannot_be_opened_stops_either_service_with_one_line(tmp_path):
    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("this is not a database, just a file someone pointed DB_PATH at\n" * 100)
    for path in (str(tmp_path / "missing-parent-file" / "x.db"), str(not_a_store)):
        (tmp_path / "missing-parent-file").write_text("a file where a directory should be")
        for service, port in (("proxy", "PROXY_PORT"), ("collector", "COLLECTOR_PORT")):
            env = dict(os.environ, DB_PATH=path, **{port: "0"}, LLAMA_URL="http://127.0.0.1:9")
            result = subprocess.run([sys.executable, "-m", service], env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, (service, path, result.stderr[-2000:])
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"llamabridge {service}: DB_PATH={path}: cannot open the store"), lines


def test_every_setting_the_services_read_is_documented_in_env_example():
    """What config.py and llamabridge/ read from the environment, each a line of .env.example
    (set, or commented out where only the environment or compose sets it)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [root / "proxy/config.py", root / "collector/config.py", *sorted((root / "llamabridge").glob("*.py"))]
    read = {name for path in sources for name in re.findall(r'env(?:\.get|_int|_float|_bool|_list)\((?:env, )?"([A-Z_]+)"', path.read_text())}
    read |= {f"POLICY_{klass.upper()}" for klass in ("main", "subagent", "title", "probe", "background")}
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", (root / ".env.example").read_text(), re.MULTILINE))
    assert read and read <= documented, sorted(read - documented)


def test_a_llama_url_that_is_not_a_url_stops_either_service_with_one_line(tmp_path):
    """A port with a typo, a missing scheme, one bad URL in a list: the one-line error and status
    2 every other bad setting gets, not a traceback from a worker that failed to boot."""
    for url, bad in (("http://127.0.0.1:80x", None), ("localhost:8080", None), ("http://a:8080,localhost:8080", "localhost:8080")):
        for service, port in (("proxy", "PROXY_PORT"), ("collector", "COLLECTOR_PORT")):
            env = dict(os.environ, DB_PATH=str(tmp_path / "x.db"), **{port: "0"}, LLAMA_URL=url)
            result = subprocess.run([sys.executable, "-m", service], env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, (service, url, result.stderr[-2000:])
            assert result.stderr.strip().splitlines() == [(f"llamabridge {service}: LLAMA_URL={bad or url!r}: expected one http(s) URL "
                                                           "such as http://127.0.0.1:8080")]