"""`make demo`, as a new user runs it: the whole stack comes up on the tiny model, serves the
real Claude Code CLI end to end, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import requests

from tests.support import processes
from tests.support.waiting import wait_until
from tests.test_claude_code import run_claude

pytestmark = pytest.mark.integration


def test_make_demo_serves_claude_code_and_stops_cleanly(claude_bin, tiny_model, llama_server_bin, tmp_path):
    llama_port, proxy_port, collector_port = processes.free_port(), processes.free_port(), processes.free_port()
    env = dict(os.environ, LLAMA_URL=f"http://127.0.0.1:{llama_port}", PROXY_PORT=str(proxy_port),
               COLLECTOR_PORT=str(collector_port), DB_PATH=str(tmp_path / "demo.db"), LLAMA_MODEL=tiny_model,
               LLAMA_SERVER_BIN=llama_server_bin, COLLECT_INTERVAL="1")
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen(["make", "-s", "demo"], cwd=processes.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    proxy = f"http://127.0.0.1:{proxy_port}"
    try:
        def demo_log() -> str:
            return (tmp_path / "demo.log").read_text()

        def up() -> bool:
            assert demo.poll() is None, demo_log()  # make demo ended: no point waiting on
            return "llamabridge is up" in demo_log()

        def healthy() -> bool:
            try:
                return requests.get(proxy + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 120, what=lambda: "make demo to say it is up: " + demo_log())
        # the proxy and collector print their own "listening" a moment later
        wait_until(healthy, 30, what=lambda: "the proxy's /healthz: " + demo_log())
        home, work = tmp_path / "home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        result = run_claude(claude_bin, proxy, home, work, "Say hello.")
        assert result.returncode == 0 and result.stdout.strip(), result
        assert requests.get(proxy + "/dashboard", timeout=5).status_code == 200
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole group
        demo.wait(60)
        log.close()
    text = (tmp_path / "demo.log").read_text()
    assert "[stack    ] stopping" in text, text[-3000:]
    for port in (llama_port, proxy_port, collector_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    for prefix in ("[llama    ]", "[proxy    ]", "[collector]"):
        assert prefix in text
