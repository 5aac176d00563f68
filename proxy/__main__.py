"""`python -m proxy` serves the proxy under gunicorn; `python -m proxy env` prints client settings;
`python -m proxy keys` manages the API keys.

One gunicorn process with threads (gthread), never several processes: per-session state and
(later) the admission gate that limits what reaches llama-server must live in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llamabridge.serving import (
    bind_address,
    checked_in_a_child,
    serve,
    settings_or_exit,
    start_logging,
)
from llamabridge.settings import load_env_file

if TYPE_CHECKING:
    from .config import Settings

# The app, `requests`, the upstream client, the settings and the keys are imported where they
# are used, not here. gunicorn's arbiter is this process and only supervises; the worker it forks imports
# the app for itself. Imported here, all of it would stay resident in the arbiter for nothing
# (Flask, Werkzeug, prometheus_client, requests), counted again in the worker's memory, and the
# pages the worker shares with it are copied as soon as the worker touches their objects.

# gunicorn settings beyond llamabridge/serving.py's defaults (bench/floor.py measures a bare app under the same).
# gthread's timeout is the worker's heartbeat, not a request limit: streams may run long.
SERVER_OPTIONS = {"timeout": 120, "graceful_timeout": 10, "keepalive": 75}

# Claude Code 2.1.328 refuses CLAUDE_CODE_AUTO_COMPACT_WINDOW below this ("set it to a size of
# at least 100k"), so a smaller local context cannot make it compact early.
MIN_AUTO_COMPACT_WINDOW = 100_000
# OpenCode (1.18) never asks for more output than this, whatever a model's limit says.
OPENCODE_MAX_OUTPUT = 32_000


# What `make env` prints for the key while keys are on and none was given to it.
KEY_PLACEHOLDER = "YOUR_LLAMABRIDGE_KEY"


@dataclass(frozen=True)
class Served:
    """The served model as `make env` learns it, from the proxy or from llama-server."""

    model: str | None
    n_ctx: int
    total_slots: int | None


def context_from_proxy(base: str, key: str = "") -> tuple[Served | None, bool]:
    """The model, context window and slots as the running proxy reports them (`/v1/models`), and
    whether it asks for keys (it answered 401).

    Asked first because it is the one address that works for every way of running: in the compose
    stack llama-server is only reachable from inside Docker's network."""
    import requests

    try:
        answer = requests.get(f"{base}/v1/models", timeout=10, headers={"x-api-key": key} if key else {})
        if answer.status_code == 401:
            return None, True
        model = (answer.json().get("data") or [None])[0] if answer.ok else None
    except (requests.RequestException, ValueError, AttributeError):
        return None, False
    if not isinstance(model, dict) or not model.get("context_window"):
        return None, False
    return Served(model.get("id"), int(model["context_window"]), model.get("slots")), False


def opencode_config(base: str, model: str, n_ctx: int, key: str) -> dict:
    """OpenCode's config for this proxy: one provider (OpenCode's OpenAI-compatible adapter) with
    one model and its real window, chosen as the default model.

    OpenCode takes a local server only as a provider in its config file. Without a model limit it
    never compacts, and the turn that outgrows the window is refused by llama-server. A limit needs
    both the window and the output it keeps free for the reply: it compacts once a step has used
    the window less that output, so a large output on a small window leaves no room for a step. A
    quarter of the window: it compacts at three quarters, and a reply fits."""
    output = min(OPENCODE_MAX_OUTPUT, n_ctx // 4)
    return {
        "$schema": "https://opencode.ai/config.json",
        "model": f"llamabridge/{model}",
        "provider": {"llamabridge": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "llamabridge",
            "options": {"baseURL": f"{base}/v1", "apiKey": key},
            "models": {model: {"name": model, "limit": {"context": n_ctx, "output": output}}},
        }},
    }


def aider_metadata(model: str, n_ctx: int) -> dict:
    """Aider's model metadata (~/.aider.model.metadata.json) for litellm's `openai/<model>`.

    Without a model Aider takes gpt-4o and that model's 128k window, and it learns another model's
    window only from this file. Without it, it never warns before a prompt llama-server will refuse,
    and keeps just 1k tokens of chat history before summarizing it with the model (a generation on
    the slot); with it, a sixteenth of the window (1k to 8k)."""
    return {model: {"max_input_tokens": n_ctx, "max_output_tokens": n_ctx, "input_cost_per_token": 0,
                    "output_cost_per_token": 0, "litellm_provider": "openai", "mode": "chat"}}


def continue_models(base: str, model: str, n_ctx: int, key: str) -> list[str]:
    """The `models:` section of Continue's ~/.continue/config.yaml (its IDE extensions and its `cn`
    CLI share it). Continue budgets a chat by the model's contextLength (200,000 in cn when none is
    given): with the real window it shortens the chat to fit, or refuses a message that cannot,
    before llama-server has to."""
    return ["models:", "  - name: llamabridge", "    provider: openai", f"    model: {json.dumps(model)}",
            f"    apiBase: {base}/v1", f"    apiKey: {key}", "    roles: [chat, edit, apply]",
            *(["    defaultCompletionOptions:", f"      contextLength: {n_ctx}"] if n_ctx else [])]


def codex_config(base: str, model: str, n_ctx: int, keyed: bool) -> list[str]:
    """Codex's ~/.codex/config.toml lines. Codex takes a provider only from its config file, and
    speaks only the Responses API; its context meter and compaction go by model_context_window
    for a model it has no metadata for. It sends a key only from the variable `env_key` names
    (and refuses to start while that variable is unset, so it is named only when keys are on)."""
    return [f"model = {json.dumps(model)}", 'model_provider = "llamabridge"',
            *([f"model_context_window = {n_ctx}"] if n_ctx else []),
            "", "[model_providers.llamabridge]", 'name = "llamabridge"', f'base_url = "{base}/v1"', 'wire_api = "responses"',
            *(['env_key = "OPENAI_API_KEY"'] if keyed else [])]


def cline_command(base: str, model: str, key: str) -> str:
    """Cline's CLI setup in one line: its OpenAI-compatible provider (its Anthropic one takes no
    base URL on the command line)."""
    return f"cline auth -p openai -b {base}/v1 -k {shlex.quote(key)} -m {shlex.quote(model)}"


# `python -m proxy env --file NAME`: a client's whole config file, to redirect into place.
FILES = ("aider", "continue", "opencode", "codex")


@dataclass(frozen=True)
class Context:
    """What `make env` knows of the running proxy."""

    base: str  # the proxy's base URL for clients
    info: Served | None  # model, n_ctx, total_slots; None when neither the proxy nor llama-server answers
    name: str  # the model's short name (llama-server's may be the GGUF's path; any name is served)
    keyed: bool  # the proxy asks for keys
    key: str  # what the printed settings send as the key

    @property
    def n_ctx(self) -> int:
        return self.info.n_ctx if self.info else 0


def server_context(settings: Settings, key: str = "") -> Context:
    """The running proxy as clients see it: asked with `key` if one is given."""
    from .upstream import Upstream

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{host}:{settings.port}"
    info, refused = context_from_proxy(base, key)
    from llamabridge import keys

    keyed = refused or bool(key) or keys.KeyFile(settings.edge.keys_file).configured()
    if refused:
        print(f"# the proxy at {base} asks for a key{' and refused this one' if key else ''}: "
              "LLAMABRIDGE_API_KEY=<your key> make env prints these settings with it", file=sys.stderr)
    if info is None:
        # No proxy running here yet (a native setup being prepared), or it wants a key: ask llama-server itself.
        try:
            server = Upstream(settings).info()
            info = Served(server.model, server.n_ctx, server.total_slots)
        except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
            if refused:
                said = f"llama-server at {settings.upstream_base} did not answer either"
            else:
                said = f"neither the proxy at {base} nor llama-server at {settings.upstream_base} answered"
            print(f"# {said} ({exc}); context window unknown", file=sys.stderr)
            info = None
    name = (info.model or "").rstrip("/").rsplit("/", 1)[-1] if info else ""
    return Context(base, info, name or "local", keyed, key or (KEY_PLACEHOLDER if keyed else "llamabridge"))


def print_file(settings: Settings, which: str, key: str = "") -> int:
    """One client's config file, whole, for `> file`: nothing else goes to stdout."""
    ctx = server_context(settings, key)
    if not ctx.n_ctx:
        print("the context window is unknown (is the proxy or llama-server running?): not writing a config without it",
              file=sys.stderr)
        return 1
    if which == "aider":
        print(json.dumps(aider_metadata(f"openai/{ctx.name}", ctx.n_ctx), indent=2))
    elif which == "continue":
        print("\n".join(["name: llamabridge", "version: 1.0.0", "schema: v1", *continue_models(ctx.base, ctx.name, ctx.n_ctx, ctx.key)]))
    elif which == "opencode":
        print(json.dumps(opencode_config(ctx.base, ctx.name, ctx.n_ctx, ctx.key), indent=2))
    else:
        print("\n".join(codex_config(ctx.base, ctx.name, ctx.n_ctx, ctx.keyed)))
    return 0


def print_env(settings: Settings, key: str = "") -> int:
    """What points Claude Code, OpenAI clients, Aider, Continue, OpenCode, Codex and Cline at this
    proxy: shell exports, and lines to copy into settings and config files."""
    ctx = server_context(settings, key)
    base, info, name, n_ctx = ctx.base, ctx.info, ctx.name, ctx.n_ctx
    quoted = shlex.quote(ctx.key)
    if not ctx.keyed:
        print("# This proxy asks for no API key: any value works where one is asked for.")
    elif ctx.key == KEY_PLACEHOLDER:
        print(f"# This proxy asks for an API key: put yours in place of {KEY_PLACEHOLDER} (make keys ADD=<name> makes one),")
        print("# or run LLAMABRIDGE_API_KEY=<your key> make env to have it filled in.")
    print("# Claude Code")
    print(f"export ANTHROPIC_BASE_URL={base}")
    print(f"export ANTHROPIC_API_KEY={quoted}")
    if n_ctx:
        # The real window, for model names Claude Code does not know (it assumes 1M for those). For
        # its own names it keeps its table (2.1.328: 200k for claude-sonnet-4-5, 1M for its default
        # claude-opus-5-5), whatever this says.
        print(f"export CLAUDE_CODE_MAX_CONTEXT_TOKENS={n_ctx}")
        if n_ctx >= MIN_AUTO_COMPACT_WINDOW:
            # When to compact, and the window /context shows, for any model name; Claude Code 2.1
            # honours it from 100k tokens up.
            print(f"export CLAUDE_CODE_AUTO_COMPACT_WINDOW={n_ctx}")
        else:
            # Below 100k only a model name Claude Code does not know makes it use the real window;
            # llama-server's own name for its model is one (the proxy serves any name).
            claude_name = "local-model" if name == "local" or "claude" in name.lower() else name  # claude-*: a name it knows
            print(f"export ANTHROPIC_MODEL={shlex.quote(claude_name)}  # a name Claude Code does not know, so the line above applies")
            print(f"# This server's context ({n_ctx} tokens per slot) is below the {MIN_AUTO_COMPACT_WINDOW} tokens from which Claude Code")
            print("# compacts by itself: run /compact when /context nears it, or start llama-server with a larger -c.")
    # Not CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: it also turns off session titles, which the
    # proxy answers at once without the model.
    print("export DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 DISABLE_ERROR_REPORTING=1")
    model_id = name if info else "<any>"  # the short name: llama-server's own may be the model file's full path
    print("# Cline (settings, API Provider \"OpenAI Compatible\"); Cursor takes the same values")
    print(f"#   Base URL: {base}/v1   API Key: {ctx.key}   Model ID: {model_id}"
          + (f"   Context Window Size: {n_ctx}" if n_ctx else ""))
    print("# Cline's CLI (npm cline), once:")
    print(f"#   {cline_command(base, name, ctx.key)}")
    print("# OpenAI SDKs and Aider")
    print(f"export OPENAI_BASE_URL={base}/v1")
    print(f"export OPENAI_API_KEY={quoted}")
    # Aider reaches an OpenAI-compatible server through litellm's `openai/` prefix.
    print(f"export AIDER_MODEL={shlex.quote(f'openai/{name}')}")
    if n_ctx:
        print("# Aider's context window (its /tokens meter and its warnings): this line as ~/.aider.model.metadata.json"
              " (or: make env FILE=aider > ~/.aider.model.metadata.json)")
        print(f"#   {json.dumps(aider_metadata(f'openai/{name}', n_ctx))}")
    print("# Continue (VS Code, JetBrains, the cn CLI): this model in ~/.continue/config.yaml (or, for a new file: make env FILE=continue)")
    for line in continue_models(base, name, n_ctx, ctx.key):
        print(f"#   {line}")
    if n_ctx:
        print("# OpenCode: this line as opencode.json in the project, or as ~/.config/opencode/opencode.json"
              " (or: make env FILE=opencode > opencode.json)")
        print(f"#   {json.dumps(opencode_config(base, name, n_ctx, ctx.key))}")
    print("# Codex CLI: these lines in ~/.codex/config.toml (the model name is any; llama-server serves its own;"
          " for a new file: make env FILE=codex)" + ("; it sends $OPENAI_API_KEY, exported above" if ctx.keyed else ""))
    for line in codex_config(base, name, n_ctx, ctx.keyed):
        if line:
            print(f"#   {line}")
    if info:
        print(f"# model: {info.model}  context: {n_ctx} tokens  slots: {info.total_slots}")
    return 0


def mixed_models(settings) -> str | None:
    """Why LLAMA_URL's llama-servers cannot share one queue: those that answer serve different
    models (a session moved between them would change model mid-conversation). Those that do
    not answer yet are checked when they join (services.Services)."""
    from dataclasses import replace

    from .errors import ApiError
    from .upstream import Upstream

    served = {}
    for url in settings.upstream_urls:
        try:
            info = Upstream(replace(settings, llama_url=url, llama_urls=())).fresh_info()
        except ApiError:
            continue
        served[url] = info
    if len({info.identity for info in served.values()}) <= 1:
        return None
    said = ", ".join(f"{url} serves {info.model}" for url, info in served.items())
    return f"LLAMA_URL lists llama-servers with different models ({said}): one model per proxy; run a proxy for each"


def _create_app():
    """The app, built in gunicorn's worker: the first import of the proxy's modules there (the
    settings are read again, from the environment the arbiter was given and the .env it loaded,
    which the start-up check in a child has already accepted)."""
    from .app import create_app
    from .config import from_env

    return create_app(from_env())


def _start_check() -> dict[str, Any]:
    """What start-up is refused on (checked_in_a_child), and what gunicorn needs to know."""
    from llamabridge.edge import start_problem
    from llamabridge.serving import store_or_exit

    from .config import from_env

    settings = settings_or_exit("proxy", from_env)
    if settings.db_path:
        store_or_exit("proxy", settings.db_path)
    if problem := start_problem(settings.edge, "PROXY_HOST", settings.host):
        print(f"llamabridge proxy: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if len(settings.upstream_urls) > 1 and (problem := mixed_models(settings)):
        print(f"llamabridge proxy: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return {"bind": bind_address(settings.host, settings.port), "threads": settings.threads,
            "log_level": settings.log_level, "access_log": settings.access_log}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        from llamabridge import keys

        from .config import from_env

        # Its own sub-commands and options (llamabridge/keys.py); only the file's path comes from the settings.
        return keys.main(argv[1:], settings_or_exit("proxy", from_env).edge.keys_file)
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__.splitlines()[0],
                                     epilog="python -m proxy keys add|list|remove: the API keys (python -m proxy keys -h)")
    parser.add_argument("command", nargs="?", choices=["serve", "env", "check"], default="serve",
                        help="serve (the default); env: print the clients' settings; check: validate the settings and exit")
    parser.add_argument("--file", choices=FILES, help="with env: print only this client's config file, whole")
    parser.add_argument("--key", default=os.environ.get("LLAMABRIDGE_API_KEY", ""),
                        help="with env: your API key, to ask the proxy with and to fill in (default: $LLAMABRIDGE_API_KEY)")
    args = parser.parse_args(argv)
    if args.file and args.command != "env":
        parser.error("--file goes with env")
    if args.command == "env":
        from .config import from_env

        settings = settings_or_exit("proxy", from_env)
        return print_file(settings, args.file, args.key) if args.file else print_env(settings, args.key)
    if args.command == "check":
        _start_check()
        return 0
    options = checked_in_a_child(_start_check)
    load_env_file()  # the same .env for the worker, whose settings are read again there
    start_logging(options["log_level"])
    serve(
        _create_app,
        bind=options["bind"],
        threads=options["threads"],
        **SERVER_OPTIONS,
        loglevel=options["log_level"],
        # Every API call already gets one line from the proxy itself (llamabridge.request: route,
        # class, status, queue wait, tokens); gunicorn's line per HTTP request, which also covers
        # /metrics scrapes and dashboard polls, is for those who want it (ACCESS_LOG=true).
        accesslog="-" if options["access_log"] else None,
        # No headers in the access log: clients send API keys in them.
        access_log_format='%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"',
        proc_name="llamabridge-proxy",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
