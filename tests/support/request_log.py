"""The proxy's request log read back: the `llamabridge.request` line it writes for every API call
(proxy/metrics.py), which the agents' end-to-end tests hold against what each agent reports."""

from __future__ import annotations

import re
from dataclasses import dataclass

LINE = re.compile(r"llamabridge\.request: (?P<route>\S+) class=(?P<klass>\S+) status=(?P<status>\S+) handled=(?P<handled>\S+) "
                  r"session=(?P<session>\S+) user=(?P<user>\S+) .* prompt=(?P<prompt>\d+) cached=(?P<cached>\d+) generated=(?P<generated>\d+) "
                  r"client='(?P<client>[^']*)'")


@dataclass(frozen=True)
class Entry:
    route: str
    klass: str
    status: int | None
    handled: str
    session: str  # "-" for none
    user: str  # the API key's name; "-" for none
    prompt: int
    cached: int
    generated: int
    client: str


def entries(proxy, route: str | None = None, client: str = "") -> list[Entry]:
    """Every logged call, oldest first; only `route`'s, and only clients whose User-Agent starts with `client`."""
    found = []
    for m in map(LINE.search, proxy.log_text().splitlines()):
        if m and (route is None or m["route"] == route) and m["client"].startswith(client):
            found.append(Entry(m["route"], m["klass"], int(m["status"]) if m["status"].isdigit() else None, m["handled"],
                               m["session"], m["user"], int(m["prompt"]), int(m["cached"]), int(m["generated"]), m["client"]))
    return found
