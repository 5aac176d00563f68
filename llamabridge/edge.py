"""The edge of both services: refuse what a web page could make a browser send, and check keys.

A service on 127.0.0.1 is not private from the browser on the same machine. Any page the user
visits can send it a POST that needs no CORS preflight (`text/plain`, a form), and a page on a
name that the attacker re-points at 127.0.0.1 (DNS rebinding) can read its answers. So, on
every request, before any route runs (Jupyter Server's and Ollama's defences, together):

1. `Host` must name a loopback address, a literal IP, or a name in ALLOWED_HOSTS: a rebinding
   page's requests carry its own name. 403.
2. An `Origin` other than the service's own must be in ALLOWED_ORIGINS (`Sec-Fetch-Site` says the
   same of a cross-site request that sends none). 403. An allowed origin gets CORS headers; no
   other does.
3. A request with a body (anything but GET, HEAD, OPTIONS) must say it is JSON. 415. A browser
   cannot send a JSON content type cross-origin without a preflight, which step 2 refuses.
4. With keys configured (or the service listening beyond loopback), every route but liveness
   needs one: `x-api-key`, `Authorization: Bearer`, or HTTP Basic with the key as password.
   401. The key's name becomes the request's user (`environ["llamabridge.user"]`).

Pages and JSON for browsers get `nosniff`, no framing and a Content-Security-Policy. Each
service renders the refusals in its own error envelope (the `Refuse` it passes in).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hmac
import ipaddress
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .keys import Key, KeyFile, KeysFileError
from .keys import read as read_keys
from .settings import ConfigError, env_bool, env_list, is_loopback

log = logging.getLogger("llamabridge.edge")

USER = "llamabridge.user"
LIMITS = "llamabridge.limits"

SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
# For anything a browser renders or reads: no MIME sniffing (JSON run as a script), no framing
# (clickjacking), and nothing loaded from anywhere unless the page names it (the dashboard does).
BROWSER_HEADERS = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                   ("Cross-Origin-Resource-Policy", "same-origin"), ("Referrer-Policy", "no-referrer")]
DEFAULT_CSP = ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
# After this many failed keys from one address within a minute, each further failure is answered
# only after FAILURE_DELAY seconds, by at most SLOW_THREADS threads at a time (a flood must not
# take every thread): guessing gets slow, and the proxy keeps serving everyone else.
FAILURES_BEFORE_DELAY = 5
FAILURE_WINDOW = 60.0
FAILURE_DELAY = 1.0
SLOW_THREADS = 4

# (environ, start_response, status, message, code, extra headers) -> the refusal's body, in the
# service's envelope. `code` is OpenAI's error code ("invalid_api_key").
Refuse = Callable[[dict, Callable, int, str, "str | None", list], Iterable[bytes]]
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


@dataclass(frozen=True)
class EdgeSettings:
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    keys_file: str = "data/keys.json"
    allow_unauthenticated: bool = False
    metrics_key: str = ""  # opens GET /metrics only: for a Prometheus that scrapes a service with keys
    published: str = ""  # where a container runtime publishes the service (compose: BIND_ADDR); "" = its own listening address


def settings_from_env(env: Mapping[str, str], db_path: str) -> EdgeSettings:
    """API_KEYS_FILE (default: keys.json beside the store), ALLOWED_HOSTS, ALLOWED_ORIGINS,
    ALLOW_UNAUTHENTICATED, METRICS_API_KEY and PUBLISHED_ADDR."""
    origins = env_list(env, "ALLOWED_ORIGINS")
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ConfigError(f"ALLOWED_ORIGINS: {origin!r} is not an origin (scheme://host[:port], e.g. https://app.example.com)")
    keys_file = env.get("API_KEYS_FILE", "").strip()
    if not keys_file:
        keys_file = str(Path(db_path or "data/llamabridge.db").parent / "keys.json")
    return EdgeSettings(
        allowed_hosts=tuple(h.lower() for h in env_list(env, "ALLOWED_HOSTS")),
        allowed_origins=tuple(o.rstrip("/") for o in origins),
        keys_file=keys_file,
        allow_unauthenticated=env_bool(env, "ALLOW_UNAUTHENTICATED", False),
        metrics_key=env.get("METRICS_API_KEY", "").strip(),
        published=env.get("PUBLISHED_ADDR", "").strip(),
    )


def start_problem(settings: EdgeSettings, listen_var: str, host: str) -> str | None:
    """Why a service must not start, in one line: its keys file is unreadable, or it would answer
    beyond this machine without keys and nobody said ALLOW_UNAUTHENTICATED. None when it may."""
    try:
        has_keys = bool(read_keys(settings.keys_file))
    except KeysFileError as exc:
        return f"API_KEYS_FILE: {exc}"
    where, var = (settings.published, "BIND_ADDR") if settings.published else (host, listen_var)
    if is_loopback(where) or settings.allow_unauthenticated or has_keys:
        return None
    return (f"{var}={where or '(every interface)'} reaches beyond this machine, but API_KEYS_FILE={settings.keys_file} "
            "has no keys: add one (make keys ADD=<name>, or python -m proxy keys add <name>), "
            "or set ALLOW_UNAUTHENTICATED=true to serve anyone who can reach it")


def required(settings: EdgeSettings, host: str) -> bool:
    """Whether every request needs a key even when the keys file has none (left): the service
    answers beyond loopback, so it fails closed."""
    return not (settings.allow_unauthenticated or is_loopback(settings.published or host))


def _hostname(host: str) -> str:
    """`Host` without its port, lower case ("[::1]:9090" is "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _netloc(host: str, scheme: str) -> str:
    host = host.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return host[: -len(default)] if default and host.endswith(default) else host


def _json_type(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or ("/" in mime and mime.endswith("+json"))


def credentials(environ: dict) -> list[str]:
    """Every key the request presents: `x-api-key`, `Authorization: Bearer`, or HTTP Basic's
    password (its user name when the password is empty, as `curl -u KEY:` sends it)."""
    found = []
    if key := environ.get("HTTP_X_API_KEY", "").strip():
        found.append(key)
    scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer" and value:
        found.append(value)
    elif scheme == "basic" and value:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return found
        if password or user:
            found.append(password or user)
    return found


class _Failures:
    """Failed keys per client address over the last minute (bounded: old addresses are forgotten)."""

    def __init__(self):
        self._by_address: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._slow = threading.BoundedSemaphore(SLOW_THREADS)

    def add(self, address: str) -> int:
        now = time.monotonic()
        with self._lock:
            if len(self._by_address) > 4096:
                self._by_address = {a: d for a, d in self._by_address.items() if d and d[-1] > now - FAILURE_WINDOW}
            seen = self._by_address.setdefault(address, deque())
            while seen and seen[0] <= now - FAILURE_WINDOW:
                seen.popleft()
            seen.append(now)
            return len(seen)

    def delay(self, count: int) -> None:
        """Hold this refusal back a moment once an address keeps failing (on a free slow thread)."""
        if count > FAILURES_BEFORE_DELAY and self._slow.acquire(blocking=False):
            try:
                time.sleep(FAILURE_DELAY)  # the delay is the point: nothing to wait for
            finally:
                self._slow.release()


class Edge:
    """WSGI middleware in front of a service: `app.wsgi_app = Edge(app.wsgi_app, ...)`.

    `open_routes` are the (method, path) pairs that need no key (liveness); `login_prefixes` the
    paths a browser opens, whose 401 asks it for Basic credentials. `refused(reason)` counts
    each refusal (host, origin, content_type, key)."""

    def __init__(self, app: WSGIApp, settings: EdgeSettings, keys: KeyFile, refuse: Refuse, *, required: bool,
                 open_routes: frozenset[tuple[str, str]], login_prefixes: tuple[str, ...] = (),
                 refused: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.settings = settings
        self.keys = keys
        self.refuse = refuse
        self.required = required  # listening beyond loopback: a key is needed even if the file has none left
        self.open_routes = open_routes
        self.login_prefixes = login_prefixes
        self.refused = refused
        self.failures = _Failures()
        self._hosts: dict[str, bool] = {}
        self._metrics_key = settings.metrics_key.encode()

    # -- the checks, in order ----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        host = environ.get("HTTP_HOST")
        if host is not None and not self._host_allowed(host):
            return self._refuse(environ, start_response, "host", 403,
                                f"Host {host!r} is not this machine's: to reach llamabridge by that name, add "
                                f"{_hostname(host)!r} to ALLOWED_HOSTS (names are refused so that a web page cannot "
                                "re-point its own name here: DNS rebinding)")
        origin = environ.get("HTTP_ORIGIN")
        cross_origin = origin if origin is not None and not self._same_origin(origin, host) else None
        if cross_origin is not None and not self._origin_allowed(cross_origin):
            return self._refuse(environ, start_response, "origin", 403,
                                f"requests from web pages at {origin!r} are refused: add it to ALLOWED_ORIGINS to allow them")
        if origin is None and environ.get("HTTP_SEC_FETCH_SITE") in ("cross-site", "same-site") \
                and environ.get("HTTP_SEC_FETCH_MODE") != "navigate":
            return self._refuse(environ, start_response, "origin", 403, "requests from other web sites are refused")
        if cross_origin is not None and method == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            return self._preflight(environ, start_response, cross_origin)
        if method not in SAFE_METHODS and not _json_type(environ.get("CONTENT_TYPE", "")):
            return self._refuse(environ, start_response, "content_type", 415,
                                f"{method} needs a JSON body with Content-Type: application/json "
                                f"(got {environ.get('CONTENT_TYPE') or 'none'})")
        path = environ.get("PATH_INFO", "")
        if (method, path) not in self.open_routes and (self.required or self.keys.configured()):
            presented = credentials(environ)
            key = self._authenticate(presented, environ, method, path)
            if key is None:
                return self._unauthorized(environ, start_response, path, bool(presented))
            if isinstance(key, Key):
                environ[USER] = key.name
                environ[LIMITS] = key.limits
        if cross_origin is not None or method in SAFE_METHODS:
            start_response = self._with_headers(start_response, cross_origin, browser=method in SAFE_METHODS)
        return self.app(environ, start_response)

    def _host_allowed(self, host: str) -> bool:
        known = self._hosts.get(host)
        if known is None:
            name = _hostname(host)
            try:
                ipaddress.ip_address(name)
                known = True  # a literal address: no name for a web page to re-point
            except ValueError:
                known = name == "localhost" or any(fnmatch.fnmatchcase(name, allowed) for allowed in self.settings.allowed_hosts)
            if len(self._hosts) < 1024:
                self._hosts[host] = known
        return known

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        scheme, _, rest = origin.partition("://")
        return host is not None and bool(rest) and _netloc(rest, scheme.lower()) == _netloc(host, scheme.lower())

    def _origin_allowed(self, origin: str) -> bool:
        origin = origin.rstrip("/")
        return any(allowed == "*" or fnmatch.fnmatchcase(origin.lower(), allowed.lower()) for allowed in self.settings.allowed_origins)

    def _authenticate(self, presented: list[str], environ: dict, method: str, path: str) -> Key | bool | None:
        """The key among those presented (True for the metrics key on /metrics), or None."""
        for candidate in presented:
            if (key := self.keys.verify(candidate)) is not None:
                return key
            if self._metrics_key and path == "/metrics" and method in ("GET", "HEAD") \
                    and hmac.compare_digest(candidate.encode(), self._metrics_key):
                return True
        address = environ.get("REMOTE_ADDR", "?")
        count = self.failures.add(address)
        if count in (1, FAILURES_BEFORE_DELAY + 1) or count % 100 == 0:
            log.warning("%s: %s on %s %s (%d in the last minute; keys are never logged)", address,
                        "a wrong API key" if presented else "no API key", method, path, count)
        self.failures.delay(count)
        return None

    # -- answers ---------------------------------------------------------------------------------

    def _refuse(self, environ: dict, start_response: Callable, reason: str, status: int, message: str,
                code: str | None = None, headers: list | None = None) -> Iterable[bytes]:
        self.refused(reason)
        # Every refusal here is final. The Anthropic and OpenAI SDKs retry what a server does not
        # say is (Claude Code 2.1 retries a 401 for minutes); X-Should-Retry says it.
        return self.refuse(environ, start_response, status, message, code,
                           [*BROWSER_HEADERS, DEFAULT_CSP, ("X-Should-Retry", "false"), *(headers or [])])

    def _unauthorized(self, environ: dict, start_response: Callable, path: str, presented: bool) -> Iterable[bytes]:
        headers = []
        if path.startswith(self.login_prefixes):
            headers.append(("WWW-Authenticate", 'Basic realm="llamabridge", charset="UTF-8"'))
        if presented:
            message = "this API key is not valid here (wrong, or removed with `keys remove`)"
        else:
            message = ("this llamabridge needs an API key: send it as x-api-key or Authorization: Bearer "
                       "(ANTHROPIC_API_KEY, OPENAI_API_KEY; `make env` shows each client's setting)")
        return self._refuse(environ, start_response, "key", 401, message, "invalid_api_key", headers)

    def _preflight(self, environ: dict, start_response: Callable, origin: str) -> Iterable[bytes]:
        headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                   ("Access-Control-Allow-Methods", "GET, POST, HEAD, OPTIONS"), ("Access-Control-Max-Age", "600")]
        if asked := environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"):
            headers.append(("Access-Control-Allow-Headers", asked))
        start_response("204 No Content", headers)
        return []

    @staticmethod
    def _with_headers(start_response: Callable, origin: str | None, browser: bool) -> Callable:
        def start(status: str, headers: list, exc_info=None):
            if origin is not None:
                headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                            ("Access-Control-Expose-Headers", "Retry-After, X-Llamabridge-Token-Count")]
            if browser:
                headers += BROWSER_HEADERS
                if not any(name.lower() == "content-security-policy" for name, _ in headers):
                    headers.append(DEFAULT_CSP)
            return start_response(status, headers, exc_info)
        return start
