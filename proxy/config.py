"""Settings, read once from the environment at start-up, validated, and passed down.

Nothing else in the proxy reads `os.environ`: a module that needs a knob takes the
`Settings` object. Every variable here is documented, with its default, in `.env.example`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlparse

UPSTREAM_APIS = ("openai", "anthropic", "auto")


class ConfigError(ValueError):
    """A setting is present but unusable; the message names the variable and what it accepts."""


@dataclass(frozen=True)
class Settings:
    llama_url: str = "http://127.0.0.1:8080"
    llama_api_key: str = ""
    host: str = "127.0.0.1"
    port: int = 9090
    upstream_api: str = "openai"
    upstream_model: str = ""
    threads: int = 64
    max_request_bytes: int = 32 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    log_level: str = "info"

    @property
    def upstream_base(self) -> str:
        return self.llama_url.rstrip("/")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
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


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected a number from {low} to {high}")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    llama_url = env.get("LLAMA_URL", "").strip() or Settings.llama_url
    parsed = urlparse(llama_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"LLAMA_URL={llama_url!r}: expected an http(s) URL such as http://127.0.0.1:8080")
    upstream_api = (env.get("UPSTREAM_API", "").strip() or Settings.upstream_api).lower()
    if upstream_api not in UPSTREAM_APIS:
        raise ConfigError(f"UPSTREAM_API={upstream_api!r}: expected one of {', '.join(UPSTREAM_APIS)}")
    log_level = (env.get("LOG_LEVEL", "").strip() or Settings.log_level).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"LOG_LEVEL={log_level!r}: expected debug, info, warning or error")
    return Settings(
        llama_url=llama_url,
        llama_api_key=env.get("LLAMA_API_KEY", "").strip(),
        host=env.get("PROXY_HOST", "").strip() or Settings.host,
        port=_int(env, "PROXY_PORT", Settings.port, 0, 65535),
        upstream_api=upstream_api,
        upstream_model=env.get("UPSTREAM_MODEL", "").strip(),
        threads=_int(env, "PROXY_THREADS", Settings.threads, 2, 1024),
        max_request_bytes=_int(env, "MAX_REQUEST_BYTES", Settings.max_request_bytes, 1024, 1 << 31),
        connect_timeout=_float(env, "UPSTREAM_CONNECT_TIMEOUT", Settings.connect_timeout, 0.1, 600),
        read_timeout=_float(env, "UPSTREAM_READ_TIMEOUT", Settings.read_timeout, 1, 86400),
        log_level=log_level,
    )
