"""`make demo` and `make run` (scripts/run_stack.py), as a new user runs them: the whole stack comes
up on the tiny model, serves the real Claude Code CLI end to end, and Ctrl-C or closing the
terminal stops every process it started; a `.env` copied from `.env.example` changes none of it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
import requests

from tests.support import processes
from tests.support.waiting import wait_until
from tests.test_claude_code import run_claude

pytestmark = pytest.mark.integration

spec = importlib.util.spec_from_file_location("run_stack", processes.ROOT / "scripts" / "run_stack.py")
assert spec is not None and spec.loader is not None, "scripts/run_stack.py is missing"
run_stack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_stack)


@pytest.fixture
def example_env_file(tmp_path) -> str:
    """`cp .env.example .env`, as the README's Docker steps tell a user to do."""
    path = tmp_path / ".env"
    shutil.copy(processes.ROOT / ".env.example", path)
    return str(path)


def test_a_copied_env_example_means_the_defaults(example_env_file):
    env, read = run_stack.stack_env({"LLAMABRIDGE_ENV_FILE": example_env_file}, demo=False)
    assert read == example_env_file
    # `LLAMA_URL=` in the file is "unset", not an empty URL (which crashed `make run`)
    assert env["LLAMA_URL"] == "http://127.0.0.1:8080"
    assert env["LLAMA_CTX"] == "65536" and env["DB_PATH"] == "data/llamabridge.db"
    assert run_stack.kv_cache_dir(env, demo=False) == processes.ROOT / "data" / "kv-cache"


def test_the_demo_keeps_its_own_model_port_and_store_over_env_but_not_over_the_environment(example_env_file, tmp_path):
    with open(example_env_file, "a") as f:
        f.write("LLAMA_URL=http://127.0.0.1:8080\nLLAMA_MODEL=/models/mine.gguf\nLLAMA_EXTRA_ARGS=-ngl 99\nPROXY_PORT=9999\n")
    env, _ = run_stack.stack_env({"LLAMABRIDGE_ENV_FILE": example_env_file}, demo=True)
    assert {name: env[name] for name in run_stack.DEMO_SETTINGS} == run_stack.DEMO_SETTINGS
    assert env["PROXY_PORT"] == "9999"  # everything else in .env still applies
    mine = str(tmp_path / "mine.db")
    env, _ = run_stack.stack_env({"LLAMABRIDGE_ENV_FILE": example_env_file, "DB_PATH": mine, "LLAMA_CTX": ""},
                                 demo=True)
    assert env["DB_PATH"] == mine and env["LLAMA_CTX"] == "32768"


def test_the_llama_server_it_starts_saves_prompt_caches_where_the_proxy_is_told_to_look(example_env_file, tmp_path):
    """--slot-save-path names KV_CACHE_DIR as an absolute path (main() gives the proxy the same
    one): data/kv-cache by default, the demo's own directory whatever .env says, the
    environment over both, and nothing for off."""
    def saves_in(environ: dict[str, str], demo: bool) -> str | None:
        env, _ = run_stack.stack_env({"LLAMABRIDGE_ENV_FILE": example_env_file, **environ}, demo=demo)
        cmd = run_stack.llama_command("llama-server", {**env, "LLAMA_MODEL": "m.gguf"}, 8080,
                                      run_stack.kv_cache_dir(env, demo))
        return cmd[cmd.index("--slot-save-path") + 1] if "--slot-save-path" in cmd else None

    assert saves_in({}, demo=False) == str(processes.ROOT / "data" / "kv-cache")
    assert saves_in({}, demo=True) == str(processes.ROOT / "data" / "demo-kv-cache")
    with open(example_env_file, "a") as f:
        f.write("KV_CACHE_DIR=elsewhere/kv\n")
    assert saves_in({}, demo=False) == str(processes.ROOT / "elsewhere" / "kv")  # relative to the repository, as DB_PATH
    assert saves_in({}, demo=True) == str(processes.ROOT / "data" / "demo-kv-cache")  # not the user's files
    assert saves_in({"KV_CACHE_DIR": str(tmp_path)}, demo=True) == str(tmp_path)
    assert saves_in({"KV_CACHE_DIR": "off"}, demo=False) is None


def start_stack(env: dict[str, str], log_path) -> subprocess.Popen:
    """`make run` (scripts/run_stack.py) in a session of its own, its log in `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "scripts/run_stack.py"], cwd=processes.ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def kill_all(stack: subprocess.Popen, children: list[psutil.Process]) -> None:
    """Whatever is left after a failure: nothing must outlive the test."""
    for pid in [stack.pid, *(child.pid for child in children)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stack.wait()


def test_closing_the_terminal_stops_the_stack(llama, tmp_path, example_env_file):
    """A hangup (the terminal closed) stops the services like Ctrl-C: they run in sessions of their
    own, so nothing else would end them."""
    proxy_port, collector_port = processes.free_port(), processes.free_port()
    env = dict(os.environ, LLAMA_URL=llama.url, PROXY_PORT=str(proxy_port), COLLECTOR_PORT=str(collector_port),
               DB_PATH=str(tmp_path / "run.db"), LLAMABRIDGE_ENV_FILE=example_env_file)
    log_path = tmp_path / "run.log"
    stack = start_stack(env, log_path)
    children: list[psutil.Process] = []
    try:
        def up() -> bool:
            assert stack.poll() is None, log_path.read_text()
            return "llamabridge is up" in log_path.read_text()

        wait_until(up, 60, what=lambda: "the stack to say it is up: " + log_path.read_text())
        # It cannot know where a llama-server it did not start saves, and says so.
        assert "started with --slot-save-path" in log_path.read_text()
        children = psutil.Process(stack.pid).children()
        assert len(children) == 2, children  # the proxy and the collector
        stack.send_signal(signal.SIGHUP)
        assert stack.wait(30) == 0, log_path.read_text()
        assert "[stack    ] stopping" in log_path.read_text()
        assert not psutil.wait_procs(children, timeout=10)[1], "services left running after the hangup"
    finally:
        kill_all(stack, children)


def test_make_run_in_front_of_several_llama_servers_starts_none_and_reads_each(llama, llama_server_bin, tiny_model,
                                                                             tmp_path, example_env_file):
    """LLAMA_URL listing two running llama-servers: `make run` starts no llama-server of its own
    (it used to take the list for one URL that did not answer, and refuse to start), the proxy
    routes across both, and the collector reads both."""
    proxy_port, collector_port = processes.free_port(), processes.free_port()
    with processes.llama_server(llama_server_bin, tiny_model) as second:
        urls = f"{llama.url},{second.url}"
        env = dict(os.environ, LLAMA_URL=urls, PROXY_PORT=str(proxy_port), COLLECTOR_PORT=str(collector_port),
                   DB_PATH=str(tmp_path / "run.db"), COLLECT_INTERVAL="0.5", LLAMABRIDGE_ENV_FILE=example_env_file)
        log_path = tmp_path / "run.log"
        stack = start_stack(env, log_path)
        children: list[psutil.Process] = []
        try:
            wait_until(lambda: stack.poll() is None and "llamabridge is up" in log_path.read_text(), 60,
                       what=lambda: "the stack to say it is up: " + log_path.read_text())
            assert "using the 2 llama-servers in LLAMA_URL, 2 answering now" in log_path.read_text()
            children = psutil.Process(stack.pid).children()
            assert len(children) == 2, children  # the proxy and the collector, no llama-server

            def both_read() -> bool:
                health = requests.get(f"http://127.0.0.1:{collector_port}/healthz", timeout=5).json()
                return [(u["url"], u["up"]) for u in health["upstreams"]] == [(llama.url, True), (second.url, True)]

            wait_until(both_read, 30, what="the collector to read both llama-servers")
            ready = requests.get(f"http://127.0.0.1:{proxy_port}/healthz", timeout=5).json()["upstreams"]
            assert [(u["url"], u["ready"]) for u in ready] == [(llama.url, True), (second.url, True)]
            stack.send_signal(signal.SIGINT)
            assert stack.wait(30) == 0, log_path.read_text()
        finally:
            kill_all(stack, children)

    # None of them answering: it says what to do, and starts nothing.
    nowhere = f"http://127.0.0.1:{processes.free_port()},http://127.0.0.1:{processes.free_port()}"
    done = subprocess.run([sys.executable, "scripts/run_stack.py"], cwd=processes.ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(env, LLAMA_URL=nowhere, LLAMA_MODEL=tiny_model))
    assert done.returncode == 2 and "none of the llama-servers in LLAMA_URL" in done.stdout, done.stdout + done.stderr


def test_make_demo_serves_claude_code_and_stops_cleanly(claude_bin, tiny_model, llama_server_bin, tmp_path,
                                                        example_env_file):
    llama_port, proxy_port, collector_port = processes.free_port(), processes.free_port(), processes.free_port()
    kv_cache = tmp_path / "kv" / "cache"  # not there yet: make demo creates it
    env = dict(os.environ, LLAMA_URL=f"http://127.0.0.1:{llama_port}", PROXY_PORT=str(proxy_port),
               COLLECTOR_PORT=str(collector_port), DB_PATH=str(tmp_path / "demo.db"), LLAMA_MODEL=tiny_model,
               LLAMA_SERVER_BIN=llama_server_bin, COLLECT_INTERVAL="1", LLAMABRIDGE_ENV_FILE=example_env_file,
               KV_CACHE_DIR=str(kv_cache))
    log = open(tmp_path / "demo.log", "w")  # noqa: SIM115 - `make demo` writes it until the `finally` below closes it
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
        # llama-server saves prompt caches in the directory the proxy is told about.
        services = psutil.Process(demo.pid).children(recursive=True)
        llama_cmd = next(p.cmdline() for p in services if p.cmdline()[:1] == [llama_server_bin])
        assert llama_cmd[llama_cmd.index("--slot-save-path") + 1] == str(kv_cache) and kv_cache.is_dir()
        proxy_proc = next(p for p in services if p.cmdline()[1:3] == ["-m", "proxy"])
        assert proxy_proc.environ()["KV_CACHE_DIR"] == str(kv_cache)
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
