"""Collector settings, read once from the environment (documented in .env.example)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from llamabridge.edge import EdgeSettings
from llamabridge.edge import settings_from_env as edge_from_env
from llamabridge.settings import env_float, env_int, env_urls
from llamabridge.store import Retention

DEFAULT_DB_PATH = "data/llamabridge.db"


@dataclass(frozen=True)
class CollectorSettings:
    llama_urls: tuple[str, ...] = ("http://127.0.0.1:8080",)  # every one is scraped, with totals of its own
    llama_api_key: str = ""  # sent as a Bearer token: a llama-server started with --api-key refuses /metrics without it
    db_path: str = DEFAULT_DB_PATH
    interval: float = 10.0
    host: str = "127.0.0.1"
    port: int = 9091
    log_level: str = "info"
    edge: EdgeSettings = field(default_factory=EdgeSettings)  # Host, Origin and key checks, as the proxy's
    retention: Retention = field(default_factory=Retention)  # what ages out of the store, and when


def from_env(env: Mapping[str, str] | None = None) -> CollectorSettings:
    env = os.environ if env is None else env
    # LLAMA_URL may list several llama-servers, as for the proxy: each is scraped, and the store
    # keeps lifetime totals per llama-server and their sum.
    urls = env_urls(env, "LLAMA_URL", CollectorSettings.llama_urls[0])
    db_path = env.get("DB_PATH", "").strip() or DEFAULT_DB_PATH
    return CollectorSettings(
        llama_urls=tuple(url.rstrip("/") for url in urls),
        llama_api_key=env.get("LLAMA_API_KEY", "").strip(),
        db_path=db_path,
        interval=env_float(env, "COLLECT_INTERVAL", CollectorSettings.interval, 0.05, 3600),
        host=env.get("COLLECTOR_HOST", "").strip() or CollectorSettings.host,
        port=env_int(env, "COLLECTOR_PORT", CollectorSettings.port, 0, 65535),
        log_level=(env.get("LOG_LEVEL", "").strip() or "info").lower(),
        edge=edge_from_env(env, db_path),
        retention=Retention.from_env(env),
    )
