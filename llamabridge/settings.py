"""Reading settings from the environment: one error type and one parser per kind of value.

Each service builds a frozen settings object from these once, at start-up (proxy/config.py,
collector/config.py); nothing else reads `os.environ`. A bad value raises `ConfigError`, whose
message names the variable and what it accepts; the entry points print it in one line and
exit with status 2.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting is present but unusable; the message names the variable and what it accepts."""


def load_env_file(env: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """Fill unset variables from `.env` in the working directory (or $LLAMABRIDGE_ENV_FILE).

    Variables already in the environment win, as with Docker Compose, so `X=1 make run` overrides
    the file. Called by the entry points, never on import: tests and containers stay in control."""
    from dotenv import (
        dotenv_values,  # python-dotenv: the quoting, escapes and `export` lines of real .env files
    )

    env = os.environ if env is None else env
    path = env.get("LLAMABRIDGE_ENV_FILE") or ".env"
    if not os.path.isfile(path):
        return None
    for name, value in dotenv_values(path).items():
        if value is not None and name not in env:
            env[name] = value
    return path


def env_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected a number from {low} to {high}")
    return value


def env_url(env: Mapping[str, str], name: str, default: str) -> str:
    """An http(s) base URL, checked the way the services will use it (host, port), so a typo or a
    list of URLs is this one-line error at start-up rather than a traceback in a worker."""
    raw = env.get(name, "").strip() or default
    if not raw:
        return ""
    problem = f"{name}={raw!r}: expected one http(s) URL such as http://127.0.0.1:8080"
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c in raw for c in " ,;"):
        raise ConfigError(problem)
    return raw


def env_urls(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    """A comma-separated list of http(s) base URLs, each checked as env_url checks one."""
    raw = env.get(name, "").strip() or default
    urls = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not urls:
        raise ConfigError(f"{name}={raw!r}: expected http(s) URLs such as http://127.0.0.1:8080,http://10.0.0.2:8080")
    for url in urls:
        env_url({name: url}, name, "")
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{name}={raw!r}: a URL is listed twice")
    return urls


def env_float(env: Mapping[str, str], name: str, default: float, low: float, high: float, unit: str = "seconds") -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of {unit}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected a number from {low} to {high}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def env_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped (`ALLOWED_HOSTS=a, b,` is ("a", "b"))."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only. `0.0.0.0`, `::` and an
    empty host mean every interface; a name other than `localhost` may resolve anywhere."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
