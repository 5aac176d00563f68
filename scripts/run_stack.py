"""Run the whole stack natively, without Docker: llama-server (unless LLAMA_URL already answers),
the proxy and the collector, as local processes with one combined, prefixed log. Ctrl-C (or
SIGTERM, or closing the terminal) stops them all; if any of them dies, the others are stopped too.

    LLAMA_MODEL=path/to/model.gguf python scripts/run_stack.py     # what `make run` does
    python scripts/run_stack.py --demo                             # the tiny test model (`make demo`)

The settings are the services' own environment variables (see .env.example); this adds
LLAMA_MODEL (the GGUF to serve), LLAMA_CTX (context size, default 65536; the demo uses 32768),
LLAMA_THREADS and LLAMA_EXTRA_ARGS for the llama-server it starts. That llama-server saves
prompt caches in KV_CACHE_DIR (default data/kv-cache; the demo's data/demo-kv-cache; off: none).
With several llama-servers in LLAMA_URL it starts none: the proxy and the collector use those.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llamabridge.settings import (
    load_env_file,  # after the line above makes the repository importable
)

STOP_GRACE_SECONDS = 10


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def last_line(cmd: list[str]) -> str:
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


# The llama-server `make run` starts or uses, unless set.
RUN_DEFAULTS = {"LLAMA_URL": "http://127.0.0.1:8080", "LLAMA_CTX": "65536"}

# What `make demo` serves unless the environment says otherwise. These win over `.env`, which
# describes the user's real setup: the demo must neither start their model, nor write the tiny
# model's traffic into their lifetime store, nor take their llama-server's port.
DEMO_SETTINGS = {
    "LLAMA_URL": "http://127.0.0.1:8088",  # not 8080: leave a real llama-server alone
    "LLAMA_MODEL": "",  # the tiny model, generated on start
    "LLAMA_CTX": "32768",
    "LLAMA_THREADS": "1",
    "LLAMA_EXTRA_ARGS": "",
    "DB_PATH": str(ROOT / "data" / "demo.db"),
    # Unset: the demo's own directory (KV_DEFAULTS) when it starts llama-server, not the user's.
    "KV_CACHE_DIR": "",
}

# Where the llama-server `make run` / `make demo` starts saves prompt caches, unless KV_CACHE_DIR
# says otherwise; relative to the repository, as DB_PATH's default is.
KV_DEFAULTS = {False: "data/kv-cache", True: "data/demo-kv-cache"}


def stack_env(environ: Mapping[str, str], demo: bool) -> tuple[dict[str, str], str | None]:
    """The services' environment, and the `.env` file it read, if any.

    Each setting comes from the first of: the process environment, DEMO_SETTINGS (`make demo`
    only), `.env`, RUN_DEFAULTS. An empty value counts as unset, as it does for the services
    themselves: `.env.example` ships `LLAMA_URL=` to mean "the default", and copied to `.env` it
    must not become an empty URL.
    """
    own = DEMO_SETTINGS.keys() | RUN_DEFAULTS.keys()
    env = {name: value for name, value in environ.items() if value or name not in own}
    if demo:
        env.update((name, value) for name, value in DEMO_SETTINGS.items() if name not in env)
    env_file = load_env_file(env)
    for name, value in RUN_DEFAULTS.items():
        if not env.get(name):
            env[name] = value
    return env, env_file


def kv_cache_dir(env: Mapping[str, str], demo: bool) -> Path | None:
    """The directory the llama-server this script starts saves slots in (--slot-save-path), or
    None for KV_CACHE_DIR=off. Absolute, because llama-server and the proxy must name the same one."""
    value = env.get("KV_CACHE_DIR") or KV_DEFAULTS[demo]
    if value == "off":
        return None
    return ROOT / value  # an absolute value stays as it is


def llama_command(binary: str, env: Mapping[str, str], port: int, kv_dir: Path | None) -> list[str]:
    cmd = [binary, "-m", env["LLAMA_MODEL"], "--host", "127.0.0.1", "--port", str(port),
           "--jinja", "--metrics", "-c", env["LLAMA_CTX"], "--no-webui"]
    if kv_dir is not None:
        cmd += ["--slot-save-path", str(kv_dir)]
    if env.get("LLAMA_THREADS"):
        cmd += ["-t", env["LLAMA_THREADS"]]
    return cmd + env.get("LLAMA_EXTRA_ARGS", "").split()


class Stack:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")
        self.procs[name] = proc
        threading.Thread(target=self._pump, args=(name, proc), daemon=True).start()
        return proc

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.lock:
                sys.stdout.write(f"[{name:9}] {line}")
                sys.stdout.flush()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[{'stack':9}] {text}", flush=True)

    def stop(self) -> None:
        self.stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_any(self) -> str | None:
        """Block until a child exits (returns its name) or we are asked to stop (returns None)."""
        while not self.stopping.is_set():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    return name
            self.stopping.wait(0.2)
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="serve the tiny generated test model")
    args = parser.parse_args()
    env, env_file = stack_env(os.environ, demo=args.demo)
    if env_file:
        print(f"[stack    ] settings from {env_file} (the environment wins over it)", flush=True)
    stack = Stack()
    # Closing the terminal (SIGHUP) stops the stack too, rather than leaving it running unseen:
    # the services run in sessions of their own, so the hangup reaches only this process.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stack.stopping.set())

    if args.demo and not env.get("LLAMA_MODEL"):
        stack.say("generating the tiny demo model (random weights: its words are noise, its plumbing is real)")
        env["LLAMA_MODEL"] = last_line([sys.executable, "llama/tiny_model.py"])
    llama_url = env["LLAMA_URL"].rstrip("/")
    urls = [url.strip().rstrip("/") for url in llama_url.split(",") if url.strip()]

    try:
        if len(urls) > 1:
            # Several llama-servers (the proxy routes across them): `make run` starts none of them.
            # The proxy takes one that does not answer yet into its rotation once it does.
            answering = [url for url in urls if healthy(url)]
            if not answering:
                stack.say(f"none of the llama-servers in LLAMA_URL={llama_url} answers: start them first "
                          "(`make run` starts a llama-server only when LLAMA_URL names one)")
                return 2
            stack.say(f"using the {len(urls)} llama-servers in LLAMA_URL, {len(answering)} answering now: "
                      + ", ".join(f"{url}{'' if url in answering else ' (not yet)'}" for url in urls))
            if env.get("KV_CACHE_DIR") == "off":
                env["KV_CACHE_DIR"] = ""
        elif healthy(llama_url):
            stack.say(f"using the llama-server already running at {llama_url}")
            stack.say("its prompt caches outlive a restart only if it was started with --slot-save-path "
                      "and KV_CACHE_DIR names the same directory")
            if env.get("KV_CACHE_DIR") == "off":
                env["KV_CACHE_DIR"] = ""  # the proxy's own word for "none"
        elif env.get("LLAMA_MODEL"):
            parsed = urlparse(llama_url)
            if parsed.hostname not in ("127.0.0.1", "localhost"):
                stack.say(f"LLAMA_URL={llama_url} does not answer, and a llama-server can only be started here on 127.0.0.1")
                return 2
            binary = last_line(["bash", "llama/build.sh"])
            kv_dir = kv_cache_dir(env, args.demo)
            if kv_dir is not None:
                kv_dir.mkdir(parents=True, exist_ok=True)  # llama-server refuses a missing one
            env["KV_CACHE_DIR"] = str(kv_dir or "")  # the proxy restores from where llama-server saves
            stack.start("llama", llama_command(binary, env, parsed.port or 8080, kv_dir), env)
            deadline = time.monotonic() + 600  # a large model can take minutes to load
            while not healthy(llama_url):
                if stack.procs["llama"].poll() is not None or stack.stopping.is_set() or time.monotonic() > deadline:
                    stack.say("llama-server did not come up; see its log above")
                    return 1
                time.sleep(0.1)
        else:
            stack.say(f"nothing answers at LLAMA_URL={llama_url}: set LLAMA_MODEL=path/to/model.gguf to start one, "
                      "point LLAMA_URL at a running llama-server, or try `make demo`")
            return 2

        stack.start("proxy", [sys.executable, "-m", "proxy"], env)
        stack.start("collector", [sys.executable, "-m", "collector"], env)
        host = env.get("PROXY_HOST", "127.0.0.1")
        port = env.get("PROXY_PORT", "9090")
        deadline = time.monotonic() + 30
        while not _answers(f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"):
            if stack.procs["proxy"].poll() is not None or stack.stopping.is_set() or time.monotonic() > deadline:
                stack.say("the proxy did not come up; see its log above")
                return 1
            time.sleep(0.1)
        stack.say(f"llamabridge is up: proxy http://{host}:{port} (dashboard http://{host}:{port}/dashboard), "
                  f"collector http://{env.get('COLLECTOR_HOST', '127.0.0.1')}:{env.get('COLLECTOR_PORT', '9091')}, "
                  f"llama-server {llama_url}. `make env` prints the client settings. Ctrl-C stops everything.")
        died = stack.wait_any()
        if died is not None:
            stack.say(f"{died} exited with status {stack.procs[died].returncode}; stopping the rest")
            return 1
        stack.say("stopping")
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
