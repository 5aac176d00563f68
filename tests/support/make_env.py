"""What `make env` (`python -m proxy env`) prints for a running proxy, read as a user would use it:
the exports pasted into a shell, the commented lines copied into a client's config file."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys

from tests.support import processes


def output(proxy_port: int, **overrides: str) -> str:
    """`make env` for the proxy on this port. Without keys unless `overrides` say otherwise (a
    developer's own data/keys.json must not change what the tests see)."""
    env = dict(os.environ, PROXY_PORT=str(proxy_port), API_KEYS_FILE=str(processes.ROOT / "tests" / "no-such-keys.json"))
    return subprocess.run([sys.executable, "-m", "proxy", "env"], env={**env, **overrides},
                          capture_output=True, text=True, timeout=60, cwd=processes.ROOT, check=True).stdout


def exports(out: str) -> dict[str, str]:
    """Every `export NAME=value` line, as a shell would set them."""
    return dict(word.split("=", 1) for line in out.splitlines() if line.startswith("export ")
                for word in shlex.split(line, comments=True)[1:])


def block(out: str, header: str) -> list[str]:
    """The lines a user copies for one client: the commented `#   ` lines right under the line
    that starts with `header`, without the comment marker."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    return [line.removeprefix("#   ") for line in itertools.takewhile(lambda line: line.startswith("#   "), lines[start:])]
