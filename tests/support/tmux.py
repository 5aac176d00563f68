"""Drive a full-screen terminal program inside a detached tmux session, the way a person would.

A `TmuxSession` runs one command in a pane of a given size, with exactly the environment it is
given (`env -i`), on a tmux server of its own (socket `-S` in a temp dir, no user configuration:
`-f /dev/null`), so it neither sees nor touches any tmux the developer is running. Tests type
into it with `send_text` / `send_keys`, read what it shows with `screen()` (`tmux capture-pane
-p`) and synchronise with `wait_for`, which polls the screen until a condition holds or a
deadline passes.

On exit the session (and with it that private tmux server) is killed by name, and every process
left in the pane's session is stopped: nothing outlives the test. The pane stays readable after
the program exits (`remain-on-exit`), so a crash shows up as a screen, not as a vanished session.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from re import Pattern
from typing import Self

Condition = str | Pattern[str] | Callable[[str], object]


class TmuxError(RuntimeError):
    pass


class TmuxSession:
    def __init__(self, command: Sequence[str], *, env: Mapping[str, str], cwd: Path | str,
                 width: int = 200, height: int = 50, name: str | None = None):
        self.command = list(command)
        self.env = dict(env)
        self.env.setdefault("TERM", "tmux-256color")
        self.cwd = Path(cwd)
        self.width, self.height = width, height
        self.name = name or f"lb-{uuid.uuid4().hex[:12]}"
        self._socket_dir = Path(tempfile.mkdtemp(prefix="lb-tmux-"))
        self.socket = self._socket_dir / "tmux.sock"
        self.pane_pid: int | None = None

    # -- tmux plumbing -------------------------------------------------------------------------

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["tmux", "-u", "-S", str(self.socket), "-f", "/dev/null", *args],
                                capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise TmuxError(f"tmux {' '.join(args[:3])} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def start(self) -> Self:
        if shutil.which("tmux") is None:
            raise TmuxError("tmux is not installed (Debian: apt-get install -y tmux)")
        env_args = [f"{k}={v}" for k, v in self.env.items()]
        # remain-on-exit is set in the same tmux invocation, so even a program that dies at once
        # leaves its last screen behind for the failure message.
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(self.width), "-y", str(self.height),
                   "-c", str(self.cwd), "--", "env", "-i", *env_args, *self.command,
                   ";", "set-option", "-t", self.name, "remain-on-exit", "on")
        self.pane_pid = int(self._tmux("display-message", "-p", "-t", self.name, "#{pane_pid}").stdout.strip())
        return self

    # -- input ---------------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Type `text` literally (no key-name lookup: "Enter" would be typed as five letters)."""
        self._tmux("send-keys", "-t", self.name, "-l", "--", text)

    def send_keys(self, *keys: str) -> None:
        """Press named keys: "Enter", "Up", "Escape", "C-c", ..."""
        self._tmux("send-keys", "-t", self.name, *keys)

    # -- output --------------------------------------------------------------------------------

    def screen(self) -> str:
        """The visible screen as plain text, one line per row, trailing blanks trimmed."""
        return self._tmux("capture-pane", "-p", "-t", self.name).stdout

    def is_dead(self) -> bool:
        result = self._tmux("display-message", "-p", "-t", self.name, "#{pane_dead} #{pane_dead_status}", check=False)
        return result.returncode != 0 or result.stdout.split()[:1] == ["1"]

    def wait_for(self, condition: Condition, timeout: float, *, what: str | None = None,
                 interval: float = 0.1) -> str:
        """Poll the screen until `condition` holds; return that screen.

        `condition` is a regex (str or compiled, searched with MULTILINE) or a callable taking the
        screen text and returning something truthy. Fails with the last screen on timeout, or at
        once if the program in the pane has exited.
        """
        if callable(condition):
            test, desc = condition, what or getattr(condition, "__name__", "condition")
        else:
            pattern = re.compile(condition, re.MULTILINE) if isinstance(condition, str) else condition
            test, desc = pattern.search, what or f"/{pattern.pattern}/"
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if test(text):
                return text
            if self.is_dead():
                raise TmuxError(f"the program in tmux session {self.name} exited while waiting for {desc}:\n{text}")
            if time.monotonic() > deadline:
                raise TmuxError(f"timed out after {timeout:.0f}s waiting for {desc}; screen:\n{text}")
            time.sleep(interval)

    def wait_for_change(self, before: str, timeout: float = 10.0) -> str:
        """Wait until the screen differs from `before` (e.g. after a key press)."""
        return self.wait_for(lambda text: text != before, timeout, what="the screen to change")

    # -- teardown ------------------------------------------------------------------------------

    def kill(self) -> None:
        """Kill this session by name (its private tmux server exits with it), then make sure no
        process from the pane (the program or anything it spawned) is left running."""
        self._tmux("kill-session", "-t", self.name, check=False)
        shutil.rmtree(self._socket_dir, ignore_errors=True)  # tmux leaves its socket file behind
        if self.pane_pid is None:
            return
        # kill-session hangs up the pane; give the program a moment, then insist.
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            members = _session_members(self.pane_pid)
            if sig is not None:
                for pid in members:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 5
            while members and time.monotonic() < deadline:
                time.sleep(0.05)
                members = _session_members(self.pane_pid)
            if not members:
                break
        else:
            raise TmuxError(f"processes {members} from tmux session {self.name} would not die")
        self.pane_pid = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc) -> None:
        self.kill()


def _session_members(sid: int) -> list[int]:
    """PIDs whose POSIX session is `sid` (tmux makes each pane's process a session leader)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members
