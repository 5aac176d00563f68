"""The one module that speaks HTTP to llama-server.

Uses `requests` with one Session per thread (a Session is not documented as thread-safe) and
always `stream=True`, so a relayed response is passed on as it arrives and the connection can
be closed the moment the client goes away: closing it is what tells llama-server to stop
generating and free the slot.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests

from .config import Settings
from .errors import UPSTREAM_DOWN, ApiError, from_upstream

log = logging.getLogger("llamabridge.upstream")

# Hop-by-hop headers and those `requests` sets itself are never relayed.
_SKIP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}


@dataclass(frozen=True)
class ServerInfo:
    """What the proxy needs to know about the upstream, read from `/props`."""

    model: str
    n_ctx: int
    total_slots: int
    vision: bool


class Upstream:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.base = settings.upstream_base
        self._local = threading.local()
        self._info: ServerInfo | None = None
        self._info_at = 0.0
        self._info_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Environment proxies (HTTP_PROXY) must not capture traffic to a loopback server.
            session.trust_env = False
            session.headers["Accept-Encoding"] = "identity"
            if self.settings.llama_api_key:
                session.headers["Authorization"] = f"Bearer {self.settings.llama_api_key}"
            self._local.session = session
        return session

    def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float | None = None) -> requests.Response:
        """Send a request and return the (streamed) response, whatever its status.

        Raises ApiError(529) when llama-server cannot be reached at all.
        """
        url = f"{self.base}{path}"
        try:
            return self._session().request(
                method,
                url,
                json=json_body,
                data=data,
                headers=headers,
                stream=True,
                timeout=(self.settings.connect_timeout, timeout or self.settings.read_timeout),
            )
        except requests.ConnectionError as exc:
            raise ApiError(529, UPSTREAM_DOWN.format(url=self.base, reason=_reason(exc)), retry_after=5) from None
        except requests.Timeout:
            raise ApiError(529, f"llama-server at {self.base} did not answer in time", retry_after=5) from None

    def checked(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Like `request`, but a non-2xx answer raises the ApiError a client should see."""
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 400:
            try:
                body = resp.content
            finally:
                resp.close()
            raise from_upstream(resp.status_code, body)
        return resp

    def json(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        resp = self.checked(method, path, json_body=body, timeout=timeout)
        try:
            return resp.json()
        except ValueError:
            raise ApiError(502, f"llama-server answered {path} with something that is not JSON") from None
        finally:
            resp.close()

    # -- facts about the server ---------------------------------------------------------------

    def info(self, max_age: float = 30.0) -> ServerInfo:
        """`/props`, cached for `max_age` seconds (llama-server can be restarted with a new model)."""
        now = time.monotonic()
        if self._info is not None and now - self._info_at < max_age:
            return self._info
        with self._info_lock:
            if self._info is not None and time.monotonic() - self._info_at < max_age:
                return self._info
            props = self.json("GET", "/props", timeout=10)
            settings = props.get("default_generation_settings") or {}
            modalities = props.get("modalities") or {}
            alias = str(props.get("model_alias") or props.get("model_path") or "local")
            if "/" in alias and alias.endswith(".gguf"):
                alias = os.path.basename(alias)  # llama-server's default alias is the model's path
            self._info = ServerInfo(
                model=self.settings.upstream_model or alias,
                n_ctx=int(settings.get("n_ctx") or 0),
                total_slots=int(props.get("total_slots") or 1),
                vision=bool(modalities.get("vision")),
            )
            self._info_at = time.monotonic()
            return self._info

    def health(self) -> tuple[bool, str]:
        """(reachable and ready, a short reason)."""
        try:
            resp = self.request("GET", "/health", timeout=5)
        except ApiError as exc:
            return False, exc.message
        try:
            if resp.status_code == 200:
                return True, "ok"
            return False, f"llama-server /health answered HTTP {resp.status_code}: {resp.text[:200]}"
        finally:
            resp.close()


def relay_headers(resp: requests.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE_HEADERS]


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
