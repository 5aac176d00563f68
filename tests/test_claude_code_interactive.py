"""The real Claude Code CLI used interactively, as a person would: its full-screen UI runs in a
tmux pane (tests/support/tmux.py), talking through the proxy to the real llama-server.

Interactive mode sends traffic `-p` mode does not: a session-title request (no tools, a JSON
schema asking for a "title") alongside the first prompt's main request, and `/context` fires a
burst of ~35 concurrent `POST /v1/messages/count_tokens`. One session types a prompt, runs
`/context`, types a second prompt, and checks each step finished on screen and in the proxy's
access log. The model has random weights: only structure is asserted, never words.

Claude Code 2.1.328 skips the title request entirely when CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC
is set, so unlike tests/test_claude_code.py this session only sets DISABLE_TELEMETRY (no
telemetry, but titles on). Its remaining nonessential calls fail fast on a machine without
internet; the connectivity check (`HEAD /api/hello`) goes to ANTHROPIC_BASE_URL, i.e. the proxy.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.support.tmux import TmuxSession
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

API_KEY = "sk-test-not-a-real-key"
FIRST_PROMPT = "List the files in this directory, please."
SECOND_PROMPT = "Now say goodbye in one short sentence."
# One prompt is ~23k tokens of prompt processing on a single slot at -t 1: allow for a slow machine.
TURN_TIMEOUT = 150
STARTUP_TIMEOUT = 60

# The proxy's own line per API call (proxy/metrics.py): '... llamabridge.request: /v1/messages class=main status=200 ...'
ACCESS = re.compile(r'llamabridge\.request: (?P<path>/v1/messages(?:/count_tokens)?) class=\S+ status=(?P<status>\d{3})')

# Claude Code's screens (2.1.328). The status line under the input box says "esc to interrupt"
# while a turn runs and "? for shortcuts" when idle; the selected item of a menu is marked "❯".
BUSY = "esc to interrupt"
IDLE = "? for shortcuts"
API_KEY_DIALOG = "Do you want to use this API key?"
TRUST_DIALOG = "Do you trust the files in this folder?"
THEME_DIALOG = "Choose the text style"


def claude_env(home: Path, base_url: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "DISABLE_AUTOUPDATER": "1",
        # Not CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: it also turns off session titles (see above).
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        # The tiny model's words are random and sometimes never end: bound each reply.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64",
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "32768",
    }


def skip_onboarding(home: Path, work: Path) -> None:
    """Without this Claude Code starts its first-run onboarding, which needs api.anthropic.com."""
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True,
        "projects": {str(work): {"hasTrustDialogAccepted": True}},
    }))


def selected_line(screen: str) -> str:
    """The menu line marked with the "❯" cursor (the first such line: the input box comes later)."""
    return next((line for line in screen.splitlines() if line.lstrip().startswith("❯")), "")


def answer_startup_dialogs(tui: TmuxSession) -> None:
    """Get from launch to an idle input box, answering whatever Claude Code asks on the way.

    With onboarding skipped, 2.1.328 asks exactly one thing: "Detected a custom API key in your
    environment ... Do you want to use this API key?" with "Yes" / "❯ No (recommended)". "No" is
    preselected, so: Up until "❯ Yes", then Enter. The trust and text-style dialogs are answered
    with their default (first) choice should a future version show them.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        screen = tui.wait_for(
            lambda s: IDLE in s or any(d in s for d in (API_KEY_DIALOG, TRUST_DIALOG, THEME_DIALOG)),
            max(1.0, deadline - time.monotonic()), what="the input box or a startup dialog")
        if API_KEY_DIALOG in screen:
            key = "Enter" if "Yes" in selected_line(screen) else "Up"
        elif TRUST_DIALOG in screen or THEME_DIALOG in screen:
            key = "Enter"
        else:
            return
        tui.send_keys(key)
        tui.wait_for_change(screen)


def in_input_box(text: str) -> re.Pattern[str]:
    """The input box holding `text`: "❯" then a no-break space (an echoed prompt has a plain one)."""
    return re.compile(rf"^❯\s{re.escape(text)}$", re.MULTILINE)


def after_last(screen: str, marker: str) -> str | None:
    """The part of the screen below the last line containing `marker`, or None if it is not shown.

    With marker "❯ <prompt>" (plain space) that is the echoed prompt, not the input box."""
    at = screen.rfind(marker)
    return None if at < 0 else screen[screen.find("\n", at) + 1:]


def access(log: str, path: str) -> list[str]:
    """Statuses of the POSTs to `path` in a slice of the proxy log, in order."""
    return [m["status"] for m in ACCESS.finditer(log) if m["path"] == path]


def run_prompt(tui: TmuxSession, proxy, log_start: int, prompt: str) -> str:
    """Type `prompt`, wait until its reply is shown and Claude Code is idle again; return the screen."""
    posts_before = len(access(proxy.log_text()[log_start:], "/v1/messages"))
    tui.send_text(prompt)
    tui.wait_for(in_input_box(prompt), 10, what="the prompt in the input box")
    tui.send_keys("Enter")

    def replied(screen: str) -> bool:
        # The request line is written once the response has been sent; the screen then shows
        # the echoed prompt, a "●" reply below it, and the idle status line.
        below = after_last(screen, f"❯ {prompt}")
        return (len(access(proxy.log_text()[log_start:], "/v1/messages")) > posts_before
                and below is not None and "●" in below and BUSY not in screen and IDLE in screen)

    return tui.wait_for(replied, TURN_TIMEOUT, what=f"the reply to {prompt!r}")


def test_claude_code_interactive_session_prompts_and_context_through_the_proxy(claude_bin, proxy, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    skip_onboarding(home, work)
    log_start = len(proxy.log_text())

    def new_log() -> str:
        return proxy.log_text()[log_start:]

    with TmuxSession([claude_bin, "--model", "claude-sonnet-4-5"], env=claude_env(home, proxy.url), cwd=work,
                     width=200, height=50, name=f"lb-interactive-{os.getpid()}-{time.monotonic_ns()}") as tui:
        answer_startup_dialogs(tui)

        # 1. A prompt: its reply is shown and Claude Code is idle again.
        screen = run_prompt(tui, proxy, log_start, FIRST_PROMPT)
        assert "API Error" not in screen, screen

        # 2. /context: ~35 concurrent count_tokens requests, then the context-usage breakdown.
        count_before = len(access(new_log(), "/v1/messages/count_tokens"))
        tui.send_text("/context")
        tui.wait_for(in_input_box("/context"), 10, what="/context in the input box")
        tui.send_keys("Enter")
        screen = tui.wait_for(
            lambda s: (below := after_last(s, "❯ /context")) is not None and "Context usage" in below
            and re.search(r"[\d.]+k?/[\d.]+k? tokens \(\d+%\)", below) and "Free space" in below
            and BUSY not in s and IDLE in s,
            TURN_TIMEOUT, what="the /context breakdown")
        assert "API Error" not in screen, screen
        # The breakdown can be drawn a moment before gunicorn writes the last access-log lines.
        wait_until(lambda: len(access(new_log(), "/v1/messages/count_tokens")) - count_before >= 20, 10,
                   what=lambda: f"/context's count_tokens requests in the proxy log:\n{new_log()[-4000:]}")

        # 3. A second prompt in the same conversation.
        screen = run_prompt(tui, proxy, log_start, SECOND_PROMPT)
        assert "API Error" not in screen, screen
        # Requests still in flight now (a second title request, say) are cut off when the session
        # is killed; judge only the ones the proxy has finished.
        log = new_log()

    messages, counts = access(log, "/v1/messages"), access(log, "/v1/messages/count_tokens")
    # Two main requests and at least one session-title request, all answered.
    assert len(messages) >= 3, f"POST /v1/messages statuses: {messages}\nproxy log:\n{log[-4000:]}"
    assert set(messages) == {"200"}, f"POST /v1/messages statuses: {messages}\nproxy log:\n{log[-4000:]}"
    assert len(counts) >= 20, f"/context sent {len(counts)} count_tokens requests\nproxy log:\n{log[-4000:]}"
    assert set(counts) == {"200"}, f"count_tokens statuses: {counts}\nproxy log:\n{log[-4000:]}"
    assert API_KEY not in proxy.log_text()

    # --- Request classes -------------------------------------------------------------------------
    # The proxy logs one line per request with `class=<main|subagent|title|probe|background>`.
    # Interactive mode must have produced both the main conversation and its session title.
    assert re.search(r"\bclass=main\b", log), f"no class=main line in the proxy log:\n{log[-4000:]}"
    assert re.search(r"\bclass=title\b", log), f"no class=title line in the proxy log:\n{log[-4000:]}"
