"""Settings, read once from the environment at start-up, validated, and passed down.

Nothing else in the proxy reads `os.environ`: a module that needs a knob takes the
`Settings` object. Every variable here is documented, with its default, in `.env.example`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from llamabridge.edge import EdgeSettings
from llamabridge.edge import settings_from_env as edge_from_env
from llamabridge.settings import (
    ConfigError,
    env_bool,
    env_float,
    env_int,
    env_url,
    env_urls,
)
from llamabridge.store import Retention

UPSTREAM_APIS = ("openai", "anthropic", "auto")

# What to do with each request class (see classify.py):
#   pass   send it to llama-server through the admission queue
#   local  answer without the model (titles: from the user's first words; probes: exact token count)
#   route  send it to BACKGROUND_URL, a second (small) llama-server
#   shed   529 unless a slot that holds no conversation's cache is free (Claude Code does not
#          retry a background 529, so nothing evicts the conversation's prompt cache)
POLICIES = ("pass", "local", "route", "shed")
POLICY_CLASSES = {
    "main": ("pass", "route"),
    "subagent": ("pass", "route", "shed"),
    "title": POLICIES,
    "probe": POLICIES,
    "background": ("pass", "route", "shed"),
}


# Threads of the proxy's pool kept for requests that need no llama-server slot: health checks
# (Docker's healthcheck marks a proxy that does not answer unhealthy), /metrics, token counts,
# local answers, the dashboard and its API. Every request waiting for a slot holds a thread for
# as long as it waits, so without a reserve a full queue leaves none for them. Start-up refuses
# PROXY_THREADS below QUEUE_MAX + slots + this, and the gates never hold more than PROXY_THREADS
# less this (llama-server may report more slots than assumed at start-up).
THREAD_RESERVE = 16


@dataclass(frozen=True)
class Settings:
    llama_url: str = "http://127.0.0.1:8080"  # the first of llama_urls
    llama_urls: tuple[str, ...] = ()  # LLAMA_URL's list: () is llama_url alone
    affinity_wait: float = 30.0  # AFFINITY_MAX_WAIT: how long a session waits for its upstream before moving
    health_interval: float = 2.0  # UPSTREAM_HEALTH_INTERVAL: how often each of several upstreams is asked if it is ready
    llama_api_key: str = ""
    host: str = "127.0.0.1"
    port: int = 9090
    upstream_api: str = "openai"
    upstream_model: str = ""
    threads: int = 96  # gthread starts a pool thread only once a request needs one
    max_request_bytes: int = 32 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    stall_timeout: float = 30.0  # 0: never end an answer for a llama-server that stopped working on it
    log_level: str = "info"
    access_log: bool = False  # gunicorn's line per HTTP request, beside our own line per API call
    upstream_slots: int = 0  # 0: read total_slots from llama-server's /props
    queue_max: int = 64
    queue_timeout: float = 600.0
    background_url: str = ""
    policies: tuple[tuple[str, str], ...] = ()
    min_output_tokens: int = 1024
    db_path: str = "data/llamabridge.db"  # the shared store; "" (DB_PATH=off) keeps no request log
    edge: EdgeSettings = field(default_factory=EdgeSettings)  # Host, Origin and key checks (llamabridge/edge.py)
    retention: Retention = field(default_factory=Retention)  # applied to the store hourly, as the collector does
    kv_cache_dir: str = ""  # llama-server's --slot-save-path as this process sees it; "" keeps no KV cache on disk
    kv_save_idle: float = 5.0  # seconds a session's slot stays idle after a main-loop turn before it is saved
    kv_cache_max_bytes: int = 20 * 10**9  # KV_CACHE_MAX_GB: least recently used files go past it

    def policy(self, klass: str) -> str:
        return dict(self.policies).get(klass, "pass")

    @property
    def upstream_base(self) -> str:
        return self.llama_url.rstrip("/")

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        return self.llama_urls or (self.llama_url,)


def _stall_timeout(env: Mapping[str, str]) -> float:
    """UPSTREAM_STALL_TIMEOUT: 0 turns the check off; otherwise at least a second, since the
    check asks llama-server a few times within it (upstream.StallWatch)."""
    value = env_float(env, "UPSTREAM_STALL_TIMEOUT", Settings.stall_timeout, 0, 86400)
    if 0 < value < 1:
        raise ConfigError(f"UPSTREAM_STALL_TIMEOUT={value}: expected 0 (off) or a number of seconds from 1 to 86400")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    llama_urls = env_urls(env, "LLAMA_URL", Settings.llama_url)
    llama_url = llama_urls[0]
    upstream_api = (env.get("UPSTREAM_API", "").strip() or Settings.upstream_api).lower()
    if upstream_api not in UPSTREAM_APIS:
        raise ConfigError(f"UPSTREAM_API={upstream_api!r}: expected one of {', '.join(UPSTREAM_APIS)}")
    background_url = env_url(env, "BACKGROUND_URL", "")
    defaults = {"main": "pass", "subagent": "pass", "title": "local", "probe": "local",
                "background": "route" if background_url else "shed"}
    policies = []
    for klass, allowed in POLICY_CLASSES.items():
        name = f"POLICY_{klass.upper()}"
        value = (env.get(name, "").strip() or defaults[klass]).lower()
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
        if value == "route" and not background_url:
            raise ConfigError(f"{name}=route needs BACKGROUND_URL (a second llama-server for background requests)")
        policies.append((klass, value))
    log_level = (env.get("LOG_LEVEL", "").strip() or Settings.log_level).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"LOG_LEVEL={log_level!r}: expected debug, info, warning or error")
    db_path = "" if env.get("DB_PATH", "").strip() == "off" else (env.get("DB_PATH", "").strip() or Settings.db_path)
    settings = Settings(
        llama_url=llama_url,
        llama_urls=llama_urls,
        affinity_wait=env_float(env, "AFFINITY_MAX_WAIT", Settings.affinity_wait, 0, 86400),
        health_interval=env_float(env, "UPSTREAM_HEALTH_INTERVAL", Settings.health_interval, 0.1, 3600),
        llama_api_key=env.get("LLAMA_API_KEY", "").strip(),
        host=env.get("PROXY_HOST", "").strip() or Settings.host,
        port=env_int(env, "PROXY_PORT", Settings.port, 0, 65535),
        upstream_api=upstream_api,
        upstream_model=env.get("UPSTREAM_MODEL", "").strip(),
        threads=env_int(env, "PROXY_THREADS", Settings.threads, 2, 1024),
        max_request_bytes=env_int(env, "MAX_REQUEST_BYTES", Settings.max_request_bytes, 1024, 1 << 31),
        connect_timeout=env_float(env, "UPSTREAM_CONNECT_TIMEOUT", Settings.connect_timeout, 0.1, 600),
        read_timeout=env_float(env, "UPSTREAM_READ_TIMEOUT", Settings.read_timeout, 1, 86400),
        stall_timeout=_stall_timeout(env),
        log_level=log_level,
        access_log=env_bool(env, "ACCESS_LOG", Settings.access_log),
        upstream_slots=env_int(env, "UPSTREAM_SLOTS", 0, 0, 1024),
        queue_max=env_int(env, "QUEUE_MAX", Settings.queue_max, 0, 100_000),
        queue_timeout=env_float(env, "QUEUE_TIMEOUT", Settings.queue_timeout, 0.1, 86400),
        background_url=background_url,
        policies=tuple(policies),
        min_output_tokens=env_int(env, "CONTEXT_MIN_OUTPUT", Settings.min_output_tokens, 1, 1_000_000),
        db_path=db_path,
        edge=edge_from_env(env, db_path or Settings.db_path),
        retention=Retention.from_env(env),
        kv_cache_dir="" if env.get("KV_CACHE_DIR", "").strip() == "off" else env.get("KV_CACHE_DIR", "").strip(),
        kv_save_idle=env_float(env, "KV_SAVE_IDLE", Settings.kv_save_idle, 0, 86400),
        kv_cache_max_bytes=int(env_float(env, "KV_CACHE_MAX_GB", Settings.kv_cache_max_bytes / 10**9, 0.001, 1_000_000, "GB") * 10**9),
    )
    check_threads(settings)
    return settings


def check_threads(settings: Settings) -> None:
    """Refuse a thread pool that a full queue would exhaust (THREAD_RESERVE says why)."""
    slots = settings.upstream_slots or 1  # 0: read from llama-server later; one at least
    needed = settings.queue_max + slots + THREAD_RESERVE
    if settings.threads < needed:
        slots_said = f"UPSTREAM_SLOTS={settings.upstream_slots}" if settings.upstream_slots else "1 slot (UPSTREAM_SLOTS=0)"
        raise ConfigError(f"PROXY_THREADS={settings.threads} is too few: QUEUE_MAX={settings.queue_max} waiting requests, "
                          f"{slots_said} generating and {THREAD_RESERVE} threads kept for requests that need no slot "
                          f"(health checks, metrics, the dashboard) need PROXY_THREADS>={needed}; raise PROXY_THREADS or lower QUEUE_MAX")
