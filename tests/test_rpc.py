"""llama.cpp's own distributed engine behind the proxy: two ggml-rpc-server workers on loopback
hold the tiny model's layers, a llama-server started with --rpc drives them, and the real Claude
Code CLI completes a turn through the proxy in front. The workers and that llama-server come from
`make rpc-server`'s build (the RPC backend compiled in)."""

from __future__ import annotations

import re

import psutil
import pytest

from tests.support import processes
from tests.support.waiting import wait_until
from tests.test_claude_code import run_claude

pytestmark = pytest.mark.integration


def rpc_worker(binary: str) -> processes.Service:
    # The worker prints its start-up lines with printf, which a log file would hold in stdio's
    # buffer until much later: stdbuf makes each line reach the log as it is printed.
    cmd = ["stdbuf", "-oL", binary, "--host", "127.0.0.1", "--port", str(processes.free_port()), "--threads", "1"]
    return processes.Service("ggml-rpc-server", cmd, r"endpoint\s*: 127\.0\.0\.1:(?P<port>\d+)")


def listening(worker: processes.Service) -> bool:
    """The worker prints its endpoint before it binds: wait for the socket itself."""
    assert worker.proc is not None
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == worker.port
               for c in psutil.Process(worker.proc.pid).net_connections(kind="tcp"))


def cpu_seconds(worker: processes.Service) -> float:
    assert worker.proc is not None
    times = psutil.Process(worker.proc.pid).cpu_times()
    return times.user + times.system


@pytest.fixture(scope="module")
def workers(rpc_server_bin):
    with rpc_worker(rpc_server_bin) as first, rpc_worker(rpc_server_bin) as second:
        for worker in (first, second):
            wait_until(lambda worker=worker: listening(worker), timeout=30, what=f"ggml-rpc-server to listen on {worker.port}")
        yield first, second


@pytest.fixture(scope="module")
def rpc_llama(llama_server_bin, tiny_model, workers):
    endpoints = ",".join(f"127.0.0.1:{worker.port}" for worker in workers)
    # The tiny model has 2 layers: split evenly with its output layer, both would go to the first
    # worker. 1,2 gives each worker one layer and its KV cache. Verbosity 4: llama.cpp logs which
    # device holds what only at that level.
    extra = ["--rpc", endpoints, "--tensor-split", "1,2", "-lv", "4"]
    with processes.llama_server(llama_server_bin, tiny_model, extra=extra) as server:
        yield server


def test_llama_server_puts_the_models_layers_on_both_rpc_workers(rpc_llama, workers):
    log = rpc_llama.log_text()
    for worker in workers:
        # llama.cpp names a remote buffer after its endpoint, RPC<n>[host:port], and logs what it
        # placed in each one: a layer's weights, and that layer's KV cache.
        for kind in ("model", "KV"):
            buffer = re.search(rf"RPC\d+\[127\.0\.0\.1:{worker.port}\]\s+{kind} buffer size\s+=\s+([\d.]+) MiB", log)
            assert buffer and float(buffer[1]) > 0, f"no {kind} buffer on the worker at {worker.port}:\n{log[-4000:]}"
        assert "Accepted client connection" in worker.log_text()


def test_claude_code_completes_through_the_proxy_on_rpc_workers(claude_bin, rpc_llama, workers, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    before = [cpu_seconds(worker) for worker in workers]
    with processes.proxy(rpc_llama.url) as proxy:
        result = run_claude(claude_bin, proxy.url, home, work, "Say hello in one word.")
        assert result.returncode == 0, f"stdout={result.stdout!r}\nstderr={result.stderr!r}\nproxy log:\n{proxy.log_text()[-3000:]}"
        assert result.stdout.strip() and "API Error" not in result.stdout
        assert 'llamabridge.request: /v1/messages ' in proxy.log_text()
    # The prompt's layers were computed by the workers: each one spent CPU time on the turn.
    for worker, spent in zip(workers, before, strict=True):
        assert cpu_seconds(worker) > spent, f"the worker at {worker.port} did no work:\n{worker.log_text()[-2000:]}"
